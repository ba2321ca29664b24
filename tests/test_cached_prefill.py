"""`CachedPrefill.after_prefill` and its decode masks, on hand-built segments: the mask a decode step gets over
the cached slots is the caller's (original-sequence) mask at their original columns, 0 at pad slots."""

from __future__ import annotations

import numpy as np
import torch

from vlm_prune.engine.cached import CachedPrefill


def _state(final: torch.Tensor, call_mask: torch.Tensor | None, all_valid: bool) -> CachedPrefill:
    lm_mask = torch.ones(final.shape, dtype=torch.long)
    masks = (lm_mask, False, call_mask)
    return CachedPrefill.after_prefill([(0, final)], final, (final, all_valid, None), masks, 6,
                                       np.zeros(final.shape[0], dtype=np.int64), torch.zeros(2, 6).long(), None)


def _reference(final: torch.Tensor, user_mask: torch.Tensor, tail: int) -> torch.Tensor:
    """Row by row: the user's mask at each cached slot's original column (0 at pads), then the tail's own."""
    rows = []
    for row in range(final.shape[0]):
        cached = [0 if c < 0 else int(user_mask[row, c]) for c in final[row].tolist()]
        rows.append(cached + user_mask[row, 6 : 6 + tail].tolist())
    return torch.tensor(rows)


def test_uniform_rows_have_no_pads_and_decode_masks_gather_the_callers_mask():
    final = torch.tensor([[0, 1, 4, 5], [0, 2, 3, 5]])
    call_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    state = _state(final, call_mask, all_valid=False)
    assert state.prefill_pads == [False]
    assert state.prefill_mask[0].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    user = torch.cat([call_mask, torch.tensor([[1, 0], [1, 1]])], dim=1)  # two decode columns
    got = state.segment_mask(0, user, 2, 2, torch.device("cpu"))
    assert torch.equal(got, _reference(final, user, 2))


def test_ragged_rows_have_pads_and_decode_masks_zero_them():
    final = torch.tensor([[-1, 1, 4, 5], [0, 2, 3, 5]])  # row 0 kept one token fewer: left-padded
    call_mask = torch.ones(2, 6, dtype=torch.long)
    state = _state(final, call_mask, all_valid=False)
    assert state.prefill_pads == [True]
    assert state.prefill_mask[0].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    user = torch.ones(2, 7, dtype=torch.long)
    got = state.segment_mask(0, user, 2, 1, torch.device("cpu"))
    assert got.tolist() == _reference(final, user, 1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert state.segment_mask(0, None, 2, 1, torch.device("cpu")).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_an_all_valid_prefill_needs_no_decode_mask_without_a_callers_mask():
    final = torch.tensor([[0, 2, 3]])
    state = _state(final, None, all_valid=True)
    assert state.prefill_pads == [False] and state.prefill_all_valid == [True]
    assert state.segment_mask(0, None, 1, 1, torch.device("cpu")) is None


def _continue(policy: str, mask_width: int, ids: torch.Tensor):
    from types import SimpleNamespace

    from vlm_prune.engine.continuation import continue_forward

    final = torch.tensor([[0, 1, 4, 5], [0, 2, 3, 5]])  # 2 of 6 columns pruned per row; shift 2 under "compact"
    state = CachedPrefill.after_prefill([(0, final)], final, (final, True, False), (torch.ones(2, 4).long(), False,
                                        None), 6, np.array([2, 2]), torch.zeros(2, 6).long(), None)  # fmt: skip
    adapter = SimpleNamespace(rope_rows=1, layers=[None] * 4)
    kwargs = {"inputs_embeds": torch.zeros(2, 1, 8), "attention_mask": torch.ones(2, mask_width).long(),
              "position_ids": ids}  # fmt: skip
    past = 4 + 1  # the prefill's 4 cached slots and one decoded token
    return continue_forward(kwargs, state, None, past, adapter, policy, policy == "preserve", True, None)


def test_a_continuation_gets_the_original_positions_or_the_renumbered_ones():
    ids = torch.tensor([[7], [7]])  # the 8th token of the ORIGINAL sequence (6 prompt + 1 decoded before)
    forward, rotary = _continue("preserve", 8, ids)
    assert rotary is ids and forward.mask.tolist() == [[1] * 6] * 2  # the caller's mask at the cached columns
    forward, rotary = _continue("compact", 8, ids)
    assert rotary is None and forward.rope.tolist() == [[[5], [5]]]  # 7 less the 2 pruned positions
    assert forward.columns.tolist() == [[0], [0]] and not forward.prefill and forward.layer_masks == {}


def test_a_continuation_refuses_a_mask_over_the_pruned_sequence():
    import pytest

    from vlm_prune.errors import InputError

    with pytest.raises(InputError, match="unpruned sequence so far is 8"):
        _continue("preserve", 6, torch.tensor([[7], [7]]))  # 5 cached + 1 new: the PRUNED length

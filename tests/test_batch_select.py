"""A stage selects the whole batch at once where it can (`engine/batch_select.py`, `Stage.select_batch`): the batched
top-k equals the per-item top-k of every row, FastV keeps the same tokens batched and row by row, the engine falls
back to rows where the batch does not allow it, and a wrong mask is a clear error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlm_prune
from vlm_prune.errors import PruneError
from vlm_prune.methods.base import ScorerMethod, topk_mask_batched, topk_mask_per_media
from vlm_prune.methods.fastv import FastV, batched_last_token_scores, last_token_attention_scores
from vlm_prune.methods.registry import get_method
from vlm_prune.toy_models import build_tiny, make_inputs


def _per_row_reference(scores, groups, budgets):
    """Row by row, item by item, with the per-sample function the per-row path uses."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for row in range(scores.shape[0]):
        real = groups[row] >= 0
        count = int(real.sum())
        assert bool(real[:count].all()), "pads come after a row's tokens"
        out[row, :count] = topk_mask_per_media(scores[row, :count], groups[row, :count], budgets[row].tolist())
    return out


@pytest.mark.parametrize("seed", range(12))
def test_batched_topk_equals_each_rows_per_item_topk(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, width, items = 1 + seed % 5, 1 + 3 * seed, 1 + seed % 3
    counts = torch.randint(0, width + 1, (batch,), generator=gen)
    counts[0] = width  # (one row fills the width)
    # few distinct values: many ties, which must go to the earlier token as `topk_mask` breaks them
    scores = torch.randint(0, 4, (batch, width), generator=gen).float()
    if seed % 4 == 1:
        scores[0, 0] = float("nan")
        scores[-1, -1] = float("-inf")
    groups = torch.randint(0, items, (batch, width), generator=gen)
    groups[torch.arange(width)[None, :] >= counts[:, None]] = -1
    budgets = torch.randint(0, width + 2, (batch, items), generator=gen)  # (0, and more than an item holds)
    got = topk_mask_batched(scores, groups, budgets)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, _per_row_reference(scores, groups, budgets))
    assert not got[groups < 0].any()  # pad entries are never kept


def test_batched_topk_of_an_empty_batch():
    groups, budgets = torch.zeros(3, 0, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    empty = topk_mask_batched(torch.zeros(3, 0), groups, budgets)
    assert empty.shape == (3, 0)


def test_batched_fastv_scores_equal_each_rows_scores():
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 4, 1, 10, generator=gen).softmax(-1)
    visual_index = torch.tensor([[2, 3, 5], [1, 4, -1], [7, -1, -1]])
    got = batched_last_token_scores(attention, visual_index)
    for row, count in enumerate((3, 2, 1)):
        want = last_token_attention_scores(attention[row], visual_index[row, :count])
        assert torch.equal(got[row, :count], want)


@dataclass
class _RowsOnly(FastV):
    """FastV with its own `score` and no `score_batch` of its own: must run row by row."""

    name = "fastv_rows_only"

    def score(self, ctx):
        return super().score(ctx)


@dataclass
class _NoBatch(ScorerMethod):
    layer: int = 2
    keep: float = 0.5
    needs = frozenset({"attention"})

    def score(self, ctx):
        return ctx.visual_features.norm(dim=-1)


def test_only_scorers_whose_batch_scores_match_their_own_score_are_batched():
    assert FastV(keep=0.5).stages()[0].select_batch is not None
    assert FastV(keep=0.5, per_media=False).stages()[0].select_batch is None  # one budget per sample
    assert _RowsOnly(keep=0.5).stages()[0].select_batch is None  # a rewritten score: never stale batch scores
    assert _NoBatch().stages()[0].select_batch is None
    assert get_method("random", keep=0.5).stages()[0].select_batch is None


def _count_selects(handle) -> dict:
    counts = {"select": 0, "select_batch": 0}
    for stage in handle.stages:
        for name in counts:
            original = getattr(stage, name)
            if original is None:
                continue

            def counted(ctx, original=original, name=name):
                counts[name] += 1
                return original(ctx)

            setattr(stage, name, counted)
    return counts


def _run(model, inputs, method):
    with vlm_prune.pruned(model, method) as handle, torch.no_grad():
        counts = _count_selects(handle)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        stages = [(stage.tokens_in, stage.tokens_out) for stage in handle.stats.stages]
        return counts, handle.last_kept_index.clone(), out, stages


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_fastv_batched_keeps_the_tokens_rows_keep(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=4, padding="left", prompt_lengths=[3, 9, 6, 4], num_images=[1, 2, 0, 1]
                         if family == "llava_next" else 1)  # fmt: skip
    batched = _run(model, inputs, FastV(keep=0.25))
    rows = _run(model, inputs, _RowsOnly(keep=0.25))
    assert batched[0] == {"select": 0, "select_batch": 1}  # one call for the batch, none per row
    assert rows[0]["select"] == sum(1 for n in rows[3][0][0] if sum(n)) and rows[0]["select_batch"] == 0
    assert torch.equal(batched[1], rows[1])
    assert batched[3] == rows[3]
    assert torch.equal(batched[2].sequences, rows[2].sequences)
    torch.testing.assert_close(torch.stack(batched[2].logits), torch.stack(rows[2].logits))


def test_right_padded_rows_go_row_by_row_with_the_same_tokens():
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=3, padding="right", prompt_lengths=[3, 9, 6])
    counts, kept, out, _ = _run(model, inputs, FastV(keep=0.25))
    assert counts == {"select": 3, "select_batch": 0}  # gaps before a row's end: its last token is not at L-1
    _, kept_rows, out_rows, _ = _run(model, inputs, _RowsOnly(keep=0.25))
    assert torch.equal(kept, kept_rows)
    assert torch.equal(out.sequences, out_rows.sequences)


@dataclass
class _Declines(FastV):
    name = "fastv_declines"

    def score_batch(self, batch):
        return None


@dataclass
class _WrongShape(FastV):
    name = "fastv_wrong_shape"

    def score_batch(self, batch):
        return torch.zeros(batch.media_index.shape[0], batch.media_index.shape[1] + 1)


@dataclass
class _WrongMask(FastV):
    name = "fastv_wrong_mask"

    def batch_select(self):
        return lambda batch: torch.ones(batch.media_index.shape, dtype=torch.long)


def test_a_declining_method_runs_row_by_row_and_a_wrong_result_is_an_error():
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left", prompt_lengths=[3, 7])
    counts, kept, _, _ = _run(model, inputs, _Declines(keep=0.25))
    assert counts == {"select": 2, "select_batch": 1}
    assert torch.equal(kept, _run(model, inputs, _RowsOnly(keep=0.25))[1])
    with pytest.raises(PruneError, match=r"score_batch returned \(2, 17\)"):
        _run(model, inputs, _WrongShape(keep=0.25))
    with pytest.raises(PruneError, match="select_batch returned torch.int64"):
        _run(model, inputs, _WrongMask(keep=0.25))

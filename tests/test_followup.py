"""`engine.followup`: how many tokens a follow-up call re-sends on a pruned cache, on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.engine.followup import cut_leading, resent_overlap
from vlm_prune.errors import InputError

# the cache stands for 8 original tokens (virtual past) but holds 5 (3 visual tokens were pruned)
RECORDED = torch.tensor([[1, 3, 3, 3, 3, 9, 10, 11]])
PAST, VIRTUAL = 5, 8


def test_generate_slices_by_the_physical_length_so_three_tokens_come_again():
    sent = torch.tensor([[9, 10, 11, 12, 13]])  # original positions 5..9: 5..7 are cached already
    assert resent_overlap(sent, RECORDED, PAST, VIRTUAL, torch.ones(1, PAST + 5)) == 3
    assert resent_overlap(sent, RECORDED, PAST, VIRTUAL, None) == 3  # no mask: the tokens decide


def test_a_normal_continuation_is_left_alone():
    # decode step: one new token, mask over the original sequence
    assert resent_overlap(torch.tensor([[12]]), RECORDED, PAST, VIRTUAL, torch.ones(1, VIRTUAL + 1)) == 0
    # several new tokens with a full-length mask: virtual_past + sent, not past + sent
    new = torch.tensor([[12, 13, 14, 15]])
    assert resent_overlap(new, RECORDED, PAST, VIRTUAL, torch.ones(1, VIRTUAL + 4)) == 0
    # nothing pruned: nothing to cut
    assert resent_overlap(new, RECORDED, VIRTUAL, VIRTUAL, torch.ones(1, VIRTUAL + 4)) == 0


def test_a_mask_that_claims_cached_tokens_which_differ_is_an_error():
    sent = torch.tensor([[7, 7, 7, 12, 13]])
    with pytest.raises(InputError, match="already cached"):
        resent_overlap(sent, RECORDED, PAST, VIRTUAL, torch.ones(1, PAST + 5))
    assert resent_overlap(sent, RECORDED, PAST, VIRTUAL, None) == 0  # without a mask: a new prompt


def test_cut_leading_cuts_every_per_token_kwarg():
    kwargs = {
        "input_ids": torch.arange(5).view(1, 5),
        "position_ids": torch.arange(5).view(1, 1, 5).expand(3, 1, 5),
        "attention_mask": torch.ones(1, 10),
    }
    cut_leading(kwargs, 3, 5)
    assert kwargs["input_ids"].tolist() == [[3, 4]]
    assert kwargs["position_ids"].shape == (3, 1, 2) and kwargs["position_ids"][0, 0].tolist() == [3, 4]
    assert kwargs["attention_mask"].shape == (1, 10)  # already spans the original sequence

"""`adapters.expansion`: the call's media mapped back onto the encoder's order after generate() expanded rows."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.adapters.expansion import expanded_item_index, expanded_token_index, expansion_blocks
from vlm_prune.errors import InputError


def test_no_expansion_is_the_identity():
    assert expansion_blocks([3, 0, 2], 5) == (1, [3, 0, 2])
    assert expanded_token_index([3, 0, 2], 5).tolist() == [0, 1, 2, 3, 4]
    assert expanded_item_index([3, 0, 2], [2, 1, 2]) == [0, 1, 2]


def test_rows_and_their_item_groups_repeat_group_by_group():
    # two rows: row 0 holds items A (2 tokens) and B (1 token), row 1 holds C (2 tokens); 3 copies each
    row_totals = [3, 3, 3, 2, 2, 2]
    assert expansion_blocks(row_totals, 5) == (3, [3, 2])
    # generate() turns the item list [A, B, C] into [A, B, A, B, A, B, C, C, C]
    assert expanded_item_index(row_totals, [2, 1, 2]) == [0, 1, 0, 1, 0, 1, 2, 2, 2]
    # and token rows follow: A0 A1 B0 three times, then C0 C1 three times
    assert expanded_token_index(row_totals, 5).tolist() == [0, 1, 2] * 3 + [3, 4] * 3


def test_a_row_without_media_takes_no_items():
    row_totals = [0, 0, 2, 2]
    assert expanded_item_index(row_totals, [2]) == [0, 0]
    assert expanded_token_index(row_totals, 2).tolist() == [0, 1, 0, 1]
    table = torch.tensor([[10.0], [11.0]])
    assert table[expanded_token_index(row_totals, 2)].flatten().tolist() == [10.0, 11.0, 10.0, 11.0]


@pytest.mark.parametrize(
    ("row_totals", "encoded", "message"),
    [
        ([3, 3, 3], 2, "not generate"),  # 9 tokens is no multiple of 2
        ([2, 2, 2], 4, "not generate"),  # 6 is no multiple of 4
        ([2, 2, 1, 3], 4, "copies of a row"),  # e = 2, but copies differ
    ],
)
def test_what_is_not_an_expansion_is_a_clear_error(row_totals, encoded, message):
    with pytest.raises(InputError, match=message):
        expansion_blocks(row_totals, encoded)


def test_rows_that_split_an_item_are_a_clear_error():
    # the row holds 3 tokens, but the encoded items have 2 and 2: no run of whole items adds up to 3
    with pytest.raises(InputError, match="no run of whole encoded items"):
        expanded_item_index([3, 3, 1, 1], [2, 2])

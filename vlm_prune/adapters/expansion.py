"""Map a call's media back onto the encoder's recordings when `generate()` expanded the batch.

For `num_beams > 1` or `num_return_sequences > 1`, transformers 5.x `generate()` encodes the media once for
the caller's batch, then repeats every row `e` times (`repeat_interleave`, so copies are adjacent) and every
row's group of encoded media items `e` times, group by group (`GenerationMixin._expand_multimodal_outputs`:
[A, B] for a row with two images becomes [A, B, A, B] for e = 2). What the engine recorded inside the
vision tower (Qwen grids, projector inputs, vision-tower attention) stays in the encoder's order, one group
per original row. These functions give, for each media token or item of the expanded call, the recorded one
behind it. They work on one media kind at a time; `row_totals` are the call's media tokens of that kind per
row (padding excluded), in row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm_prune.errors import InputError


def row_totals(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Media tokens of one kind (`token_id`) in each row of a (B, L) call."""
    return (input_ids == token_id).sum(dim=1).tolist()


def expansion_blocks(row_totals: Sequence[int], encoded_total: int) -> tuple[int, list[int]]:
    """(e, media tokens of each original row): the expansion factor and the size of each row's group.

    e = 1 when the call holds exactly the encoded tokens. Raises InputError when the call's media cannot
    be an expansion of the encoded media (rows whose copies differ, or a total that is not a multiple).
    """
    row_totals = [int(total) for total in row_totals]
    call_total = sum(row_totals)
    if call_total == encoded_total:
        return 1, row_totals
    if encoded_total <= 0 or call_total % encoded_total or len(row_totals) % (call_total // encoded_total):
        raise InputError(
            f"the input holds {call_total} media tokens but the vision tower encoded {encoded_total}, and the "
            "difference is not generate()'s row expansion (num_beams / num_return_sequences); pass the "
            "processor's input_ids together with the media they were built for"
        )
    expand = call_total // encoded_total
    blocks = [row_totals[start : start + expand] for start in range(0, len(row_totals), expand)]
    if any(len(set(block)) != 1 for block in blocks):
        raise InputError(
            f"generate() expanded each row {expand} times, but the copies of a row hold different numbers of "
            "media tokens; pass the processor's input_ids together with the media they were built for"
        )
    return expand, [block[0] for block in blocks]


def expanded_token_index(row_totals: Sequence[int], encoded_total: int) -> torch.Tensor:
    """(call_total,) long: the encoder-order row behind every media token of the call, rows in order."""
    expand, sizes = expansion_blocks(row_totals, encoded_total)
    if expand == 1:
        return torch.arange(encoded_total)
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    return torch.cat(
        [torch.arange(start, start + size).repeat(expand) for start, size in zip(starts, sizes)]
        or [torch.zeros(0, dtype=torch.long)]
    )


def expanded_item_index(row_totals: Sequence[int], item_sizes: Sequence[int]) -> list[int]:
    """The encoder item behind every media item of the call, in call order.

    item_sizes: media tokens of each encoded item, in encoder order. Each original row takes the next
    items whose sizes add up to its token count; each of its `e` copies takes the same items.
    """
    expand, sizes = expansion_blocks(row_totals, sum(int(size) for size in item_sizes))
    items: list[int] = []
    next_item = 0
    for size in sizes:
        first, remaining = next_item, size
        while remaining > 0 and next_item < len(item_sizes):
            remaining -= int(item_sizes[next_item])
            next_item += 1
        if remaining != 0:
            raise InputError(
                f"a row holds {size} media tokens, which no run of whole encoded items adds up to "
                f"(item sizes {list(item_sizes)}); pass the processor's input_ids with the media they were built for"
            )
        items += list(range(first, next_item)) * expand
    return items

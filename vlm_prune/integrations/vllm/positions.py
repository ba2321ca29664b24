"""M-RoPE positions of a pruned prompt before encoding (pure; vLLM's `get_mrope_input_positions` for fewer tokens).

vLLM numbers a prompt's positions when the request arrives, before any media is encoded: text runs 0, 1, ...,
an item of LLM grid (T, H, W) takes (t * t_factor, h, w) + its start, and the text after it continues from the
start + the item's extent (max coordinate + 1). vLLM's own function assumes T*H*W placeholders per item; with
fewer placeholders it would number past the prompt. `prompt_positions` gives the pruned prompt's exact (3, N)
positions: the same text positions as the unpruned prompt ("preserve"), and, for each item's k placeholders, the
first k coordinates of its grid as stand-ins. Which tokens survive is known only after encoding; then vLLM's
`recompute_mrope_positions` writes their true coordinates (`select.item_positions`) and leaves the text as is.
"""

from __future__ import annotations

import torch

from vlm_prune.integrations.vllm.select import raster_grid


def item_coordinates(grid: tuple[int, int, int], t_factor: float = 1.0) -> torch.Tensor:
    """(T*H*W, 3) long (t * t_factor, h, w) of an LLM grid in raster order (t truncated to int64 as vLLM does)."""
    coords = raster_grid(*grid)
    if t_factor != 1.0:
        coords[:, 0] = (coords[:, 0].double() * t_factor).long()
    return coords


def prompt_positions(
    num_tokens: int, items: list[tuple[int, int, tuple[int, int, int], float]]
) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) long positions and the decode delta (max + 1 - num_tokens).

    items: (offset, length, llm_grid, t_factor) per media item, `length` placeholders at `offset` (sorted or not).
    """
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0  # next prompt index
    next_position = 0
    for offset, length, grid, t_factor in sorted(items, key=lambda item: item[0]):
        text = offset - cursor
        positions[:, cursor:offset] = torch.arange(text).view(1, -1) + next_position
        start = next_position + text
        coords = item_coordinates(grid, t_factor)
        extent = int(coords.max()) + 1 if coords.numel() else 0
        positions[:, offset : offset + length] = coords[:length].T + start
        next_position = start + extent
        cursor = offset + length
    positions[:, cursor:] = torch.arange(num_tokens - cursor).view(1, -1) + next_position
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta

"""M-RoPE positions of a pruned prompt in vLLM (pure, no vLLM import): before encoding, and the media rows after.

vLLM numbers a prompt's positions when the request arrives, before any media is encoded (`get_mrope_input_positions`),
and, for a pruning model, lets the model rewrite them once the media rows are known (`recompute_mrope_positions`).

* `prompt_positions` (before encoding): text runs 0, 1, ...; a media item's placeholders get stand-in positions
  (the first ones of its unpruned layout) and the text after it continues from the item's start + its unpruned
  extent. So every TEXT position is already the one transformers gives the unpruned prompt (our "preserve"
  policy), whatever is kept, and the decode delta is final.
* `write_media_positions` (after encoding): the model appends `EXTRA` columns to each item's rows (`media_columns`):
  the kept row's original (t, h, w) relative to the item's start, its index among the item's placeholder tokens,
  and `lead` (how many placeholder tokens precede the first media token: 0, or a Qwen3-VL video's first timestamp
  and vision-start tokens), each as base-128 digits so that bfloat16 embeddings carry them exactly (vLLM's own EVS
  appends raw positions, which bfloat16 rounds above 256). Only the media rows' positions are written; text is
  left as it is. Each slice is placed from the prompt alone: a slice that continues an item split by chunked
  prefill (row index > 0) starts at the chunk's first token, any other starts `lead` tokens before the next media
  token. So an item split across prefill chunks (chunked prefill, or a prefix-cache hit inside it) gets the same
  positions as an unsplit one. (vLLM 0.32's own `recompute_mrope_positions`, which the plugin used before, re-numbers
  the text after each slice by its own rule; with it, chunks that split an item gave other tokens.)

An item's unpruned layout (`local`, (m, 3) positions relative to the item's start, and `extent`, where the text
after it continues): `grid_layout` for a Qwen2/2.5-VL item or a Qwen3-VL image; `frames_layout` for a Qwen3-VL video
(per frame: its timestamp text, vision start, the frame's h x w grid at t = 0, vision end).
"""

from __future__ import annotations

import torch

from vlm_prune.errors import PruneError
from vlm_prune.integrations.vllm.select import raster_grid

#: values carried per media row: t, h, w, index among the item's placeholder tokens, lead
VALUES = 5
#: each value as DIGITS base-BASE digits, exact in bfloat16 / float16 (which hold integers up to 256 / 2048 only)
BASE, DIGITS = 128, 3
#: extra columns on every media row
EXTRA = VALUES * DIGITS


def item_coordinates(grid: tuple[int, int, int], t_factor: float = 1.0) -> torch.Tensor:
    """(T*H*W, 3) long (t * t_factor, h, w) of an LLM grid in raster order (t truncated to int64 as vLLM does)."""
    coords = raster_grid(*grid)
    if t_factor != 1.0:
        coords[:, 0] = (coords[:, 0].double() * t_factor).long()
    return coords


def grid_layout(grid: tuple[int, int, int], t_factor: float = 1.0) -> tuple[torch.Tensor, int]:
    """(local (T*H*W, 3), extent = max coordinate + 1) of a contiguous media item of LLM grid (T, H, W)."""
    coords = item_coordinates(grid, t_factor)
    return coords, (int(coords.max()) + 1 if coords.numel() else 0)


def frames_layout(
    span: list[int], hw: tuple[int, int], vision_start: int, vision_end: int
) -> tuple[torch.Tensor, int]:
    """Unpruned layout of a Qwen3-VL video from its placeholder tokens `span` (any count of video tokens per frame).

    span: [ts_0..., VS, video..., VE, ts_1..., VS, ..., VE]; each frame is laid out unpruned (h * w tokens):
    its timestamp tokens and VS as text, the grid (0, row, col) after them, VE after the grid's extent.
    """
    h, w = hw
    grid = raster_grid(1, h, w)
    pieces, position, cursor = [], 0, 0
    while cursor < len(span):
        try:
            start = span.index(vision_start, cursor)
            end = span.index(vision_end, start)
        except ValueError:
            raise PruneError(f"a video placeholder without vision start/end markers at {cursor}: {span}") from None
        text = start + 1 - cursor  # timestamp tokens and the vision start
        pieces.append(torch.arange(position, position + text).view(-1, 1).expand(-1, 3))
        pieces.append(grid + position + text)
        position += text + max(h, w)
        pieces.append(torch.full((1, 3), position))  # vision end
        position += 1
        cursor = end + 1
    local = torch.cat(pieces) if pieces else torch.zeros(0, 3, dtype=torch.long)
    return local.long(), position


def prompt_positions(
    num_tokens: int, items: list[tuple[int, int, torch.Tensor, int]]
) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) long positions and the decode delta (max + 1 - num_tokens), before encoding.

    items: (offset, length, local, extent) per media item (sorted or not): `length` placeholders at `offset`, the
    item's unpruned layout `local` (m >= length rows) and `extent` (see the module docstring).
    """
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0  # next prompt index
    next_position = 0
    for offset, length, local, extent in sorted(items, key=lambda item: item[0]):
        if length > local.shape[0]:
            raise PruneError(f"a media item has {length} placeholders but only {local.shape[0]} unpruned tokens")
        text = offset - cursor
        positions[:, cursor:offset] = torch.arange(text).view(1, -1) + next_position
        start = next_position + text
        positions[:, offset : offset + length] = local[:length].T + start
        next_position = start + extent
        cursor = offset + length
    positions[:, cursor:] = torch.arange(num_tokens - cursor).view(1, -1) + next_position
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def encode(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(k, VALUES) long in [0, BASE**DIGITS) -> (k, EXTRA) `dtype` digits (least significant first)."""
    values = values.long()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= BASE**DIGITS):
        raise PruneError(f"media positions must lie in [0, {BASE**DIGITS}); got {values.min()}..{values.max()}")
    digits = [(values // BASE**d) % BASE for d in range(DIGITS)]
    return torch.cat(digits, dim=1).to(dtype)


def decode(columns: torch.Tensor) -> torch.Tensor:
    """(k, EXTRA) digits -> (k, VALUES) long."""
    digits = columns.detach().float().cpu().round().long().split(VALUES, dim=1)
    return sum(digit * BASE**d for d, digit in enumerate(digits))


def media_columns(coords: torch.Tensor, lead: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(k, EXTRA) extra columns of an item's k rows: coords (k, 3) relative to the item's start, as `dtype`."""
    k = coords.shape[0]
    index = torch.arange(k, dtype=torch.long).view(-1, 1)
    values = torch.cat([coords.long().cpu(), index, torch.full((k, 1), lead, dtype=torch.long)], dim=1)
    return encode(values, dtype)


def write_media_positions(
    input_ids: torch.Tensor,
    embeddings: list[torch.Tensor],
    positions: torch.Tensor,
    num_computed_tokens: int,
    media_token_ids: tuple[int, ...],
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Strip the `EXTRA` columns and write the media rows' positions (see the module docstring).

    input_ids (N,) the whole prompt; embeddings: the slices of this prefill chunk's items, in prompt order, each
    (r, D + EXTRA); positions (3, N) the prompt's positions. Returns (embeddings (r, D), positions, delta).
    """
    ids = input_ids.detach().cpu().long()
    positions = positions.clone()
    is_media = torch.isin(ids, torch.tensor(media_token_ids, dtype=torch.long))
    stripped, cursor = [], num_computed_tokens
    for embedding in embeddings:
        stripped.append(embedding[:, :-EXTRA])
        rows = embedding.shape[0]
        if rows == 0:
            continue
        extra = decode(embedding[:, -EXTRA:])
        first_index, lead = int(extra[0, 3]), int(extra[0, 4])
        if first_index > 0:  # the rest of an item the previous chunk (or a cached prefix) began
            start = cursor - first_index
        else:
            later = is_media[cursor:].nonzero(as_tuple=True)[0]
            if not len(later):
                raise PruneError(f"no media token after prompt index {cursor} for a media item of {rows} rows")
            start = cursor + int(later[0]) - lead
        base = int(positions[0, start - 1]) + 1 if start > 0 else 0
        first = start + first_index
        positions[:, first : first + rows] = extra[:, :3].T.to(positions.dtype) + base
        cursor = first + rows
    delta = int(positions.max()) + 1 - ids.numel() if ids.numel() else 0
    return stripped, positions, delta

"""Pool baseline: average-pool each media item's visual grid down to the budget.

Not from a paper: plain spatial downsampling, which METHODS.md notes beats many published methods.
It is a *merger*: it returns a `Selection` whose kept tokens are one representative per pooling cell
and whose features are the cell means, so each pooled token sits at the original grid position
(RoPE / M-RoPE coordinate) of its representative.

Rules (all deterministic):

* **Pooling layout** for an H x W frame and a budget b < H·W (`pool_layout`):
  1. if some factor pair h'·w' == b fits (h' <= H, w' <= W), take the one whose cell grid is
     closest to the frame's aspect ratio (minimise |log((h'/w') / (H/W))|, ties -> fewer rows),
     provided it is at most 2x off (e.g. 24x24 -> 64 = 8x8, 144 = 12x12, 128 = 8x16; Qwen 18x32 ->
     144 = 9x16). This is the usual "regular" average pooling;
  2. otherwise (b prime, or only skewed factor pairs) use *ragged rows*: h' row bands (same aspect
     criterion with w = b/h'), band r holding c_r = floor((r+1)b/h') - floor(rb/h') cells, so the
     cells still tile the whole frame and there are exactly b of them (c_r differ by at most 1).
  Row y falls in band (y·h') // H; in a band of c cells, column x falls in cell (x·c) // W. Every
  band and cell is non-empty, so a full grid yields exactly b tokens.
* **Representative** of a cell: its token nearest the cell centre (Euclidean in grid units), ties
  to the earlier token in sequence order.
* **Frames**: each value of the temporal coordinate t is pooled on its own (video frames; the
  LLaVA-NeXT base image at t=0 and its anyres crops at t=1), never across t. The media budget B is
  split in proportion to the frames' token counts: with cumulative counts C_f over n grid tokens,
  frame f gets floor(B·C_{f+1}/n) - floor(B·C_f/n) (equal frames: an even spread; if B < T some
  frames get none and are dropped entirely).
* **Tokens without grid coordinates** (grid_thw == -1, e.g. LLaVA-NeXT row-newline tokens) are
  dropped: the budget goes to grid tokens. Only if it exceeds them are the first of those kept,
  unchanged. A media item with no grid coordinates at all is pooled 1-D in sequence order (b
  contiguous chunks; representative = the middle token).
* **Extent** of a frame: the larger of `layout.media_grid` (H, W) and that frame's coordinates
  (LLaVA-NeXT crops lie beyond the base grid); tokens sharing a coordinate share a cell.
* **Exact counts**: a full grid yields exactly its budget. On an incomplete grid (an earlier stage
  removed tokens) empty cells produce nothing; the shortfall is filled by splitting the largest
  cell's token farthest from its centre into a cell of its own, until the budget is met. A frame
  whose budget is at least its token count is kept unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlm_prune.engine.context import Selection, SelectionContext
from vlm_prune.methods.base import Method, per_media
from vlm_prune.methods.registry import register

_MAX_ASPECT_ERROR = math.log(2.0)


def _aspect_cost(rows: int, cols: float, height: int, width: int) -> float:
    return abs(math.log((rows * width) / (cols * height)))


def pool_layout(height: int, width: int, budget: int) -> list[int]:
    """Cells per row band of the pooling layout of an H x W grid for `budget` cells (see module doc).

    Returns [c_0, ..., c_{h'-1}] with sum == min(budget, H·W), every c_r in [1, W], h' <= H.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"grid must be non-empty, got {height}x{width}")
    if budget >= height * width:
        return [width] * height
    if budget <= 0:
        return []
    candidates = [h for h in range(1, min(height, budget) + 1) if -(-budget // h) <= width]
    exact = [h for h in candidates if budget % h == 0]
    if exact:
        best = min(exact, key=lambda h: (_aspect_cost(h, budget // h, height, width), h))
        if _aspect_cost(best, budget // best, height, width) <= _MAX_ASPECT_ERROR + 1e-12:
            return [budget // best] * best
    rows = min(candidates, key=lambda h: (_aspect_cost(h, budget / h, height, width), h))
    return [(r + 1) * budget // rows - r * budget // rows for r in range(rows)]


def assign_cells(
    rows: torch.Tensor, cols: torch.Tensor, height: int, width: int, layout: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell of each grid position and the doubled cell centres.

    rows, cols: (n,) long grid coordinates in [0, H) x [0, W).
    layout: cells per row band, from `pool_layout`.
    Returns cell (n,) long in [0, sum(layout)) and centre2 (C, 2) long: 2 x (row, col) centre of each
    cell (doubled so that distances stay integer).
    """
    device = rows.device
    counts = torch.tensor(layout, dtype=torch.long, device=device)
    bands = counts.numel()
    offsets = torch.cumsum(counts, 0) - counts
    band = rows * bands // height
    per_band = counts[band]
    cell = offsets[band] + cols * per_band // width
    # Band r spans rows [ceil(rH/h'), ceil((r+1)H/h')); cell j of a c-cell band spans columns
    # [ceil(jW/c), ceil((j+1)W/c)). Centre x2 = start + end - 1.
    r = torch.arange(bands, device=device)
    row_start = -(-r * height // bands)
    row_end = -(-(r + 1) * height // bands)
    band_of_cell = torch.repeat_interleave(r, counts)
    j = torch.arange(int(counts.sum()), device=device) - offsets[band_of_cell]
    c = counts[band_of_cell]
    col_start = -(-j * width // c)
    col_end = -(-(j + 1) * width // c)
    centre2 = torch.stack([row_start[band_of_cell] + row_end[band_of_cell] - 1, col_start + col_end - 1], dim=1)
    return cell, centre2


def _accumulation_dtype(features: torch.Tensor) -> torch.dtype:
    """Means are accumulated in at least float32 (float64 stays float64)."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _pool_groups(
    features: torch.Tensor, group: torch.Tensor, distance: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representatives and means of groups.

    features (n, D); group (n,) long in [0, G); distance (n,) long: distance of the token to its
    group's centre. Returns keep_mask (n,) bool (one representative per non-empty group: smallest
    distance, then earliest) and pooled (n, D) holding, at each representative's row, its
    group mean (other rows undefined), accumulated in at least float32.
    """
    n, device = features.shape[0], features.device
    acc = _accumulation_dtype(features)
    big = torch.iinfo(torch.long).max
    best = torch.full((num_groups,), big, dtype=torch.long, device=device)
    best = best.scatter_reduce(0, group, distance, reduce="amin")
    index = torch.arange(n, device=device)
    candidate = torch.where(distance == best[group], index, torch.full_like(index, n))
    rep = torch.full((num_groups,), n, dtype=torch.long, device=device)
    rep = rep.scatter_reduce(0, group, candidate, reduce="amin")
    rep = rep[rep < n]
    sums = torch.zeros(num_groups, features.shape[1], dtype=acc, device=device)
    sums.index_add_(0, group, features.to(acc))
    sizes = torch.bincount(group, minlength=num_groups).clamp_min(1).unsqueeze(1)
    pooled = torch.zeros(n, features.shape[1], dtype=acc, device=device)
    pooled[rep] = (sums / sizes)[group[rep]]
    keep_mask = torch.zeros(n, dtype=torch.bool, device=device)
    keep_mask[rep] = True
    return keep_mask, pooled


def pool_1d(features: torch.Tensor, budget: int) -> Selection:
    """Pool n tokens in sequence order into min(budget, n) contiguous chunks.

    features (n, D) -> Selection(keep_mask (n,), features (k, D)); representative = middle token.
    """
    n = features.shape[0]
    k = max(0, min(int(budget), n))
    index = torch.arange(n, device=features.device)
    if k == 0:
        return Selection(torch.zeros(n, dtype=torch.bool, device=features.device), features[:0])
    chunk = index * k // n
    start = -(-torch.arange(k, device=features.device) * n // k)
    end = -(-torch.arange(1, k + 1, device=features.device) * n // k)
    middle2 = (start + end - 1)[chunk]
    distance = (2 * index - middle2).abs()
    keep_mask, pooled = _pool_groups(features, chunk, distance, k)
    return Selection(keep_mask, pooled[keep_mask].to(features.dtype))


def pool_grid(
    features: torch.Tensor, grid_thw: torch.Tensor, grid: tuple[int, int, int] | None, budget: int
) -> Selection:
    """Average-pool ONE media item to `budget` tokens (rules in the module docstring).

    features: (n, D) the item's tokens in sequence order.
    grid_thw: (n, 3) long (t, h, w) coordinates, -1 for tokens outside the grid.
    grid: the item's (T, H, W) from the layout, or None.
    Returns Selection(keep_mask (n,), features (k, D) cell means of the kept tokens, in order).
    """
    n, device = features.shape[0], features.device
    budget = max(0, min(int(budget), n))
    on_grid = (grid_thw >= 0).all(dim=1)
    if not bool(on_grid.any()):
        return pool_1d(features, budget)
    gridded = on_grid.nonzero(as_tuple=True)[0]
    off_grid = (~on_grid).nonzero(as_tuple=True)[0]
    coords = grid_thw[gridded]
    frames, frame_sizes = torch.unique(coords[:, 0], return_counts=True)
    cumulative = [0, *torch.cumsum(frame_sizes, 0).tolist()]
    grid_budget = min(budget, gridded.numel())

    keep_mask = torch.zeros(n, dtype=torch.bool, device=device)
    keep_mask[off_grid[: budget - grid_budget]] = True  # only when the budget exceeds the grid tokens
    pooled = features.to(_accumulation_dtype(features), copy=True)
    for f, frame in enumerate(frames.tolist()):
        # the grid budget split in proportion to the frames' token counts
        frame_budget = grid_budget * cumulative[f + 1] // len(gridded) - grid_budget * cumulative[f] // len(gridded)
        members = gridded[coords[:, 0] == frame]
        if frame_budget >= members.numel():
            keep_mask[members] = True
            continue
        if frame_budget == 0:
            continue
        rows, cols = grid_thw[members, 1], grid_thw[members, 2]
        height = max(grid[1] if grid else 1, int(rows.max()) + 1)
        width = max(grid[2] if grid else 1, int(cols.max()) + 1)
        cell, centre2 = assign_cells(rows, cols, height, width, pool_layout(height, width, frame_budget))
        distance = (2 * rows - centre2[cell, 0]) ** 2 + (2 * cols - centre2[cell, 1]) ** 2
        cell, distance = _split_to_budget(cell, distance, frame_budget)
        frame_keep, frame_pooled = _pool_groups(features[members], cell, distance, frame_budget)
        keep_mask[members[frame_keep]] = True
        pooled[members[frame_keep]] = frame_pooled[frame_keep]
    return Selection(keep_mask, pooled[keep_mask].to(features.dtype))


def _split_to_budget(cell: torch.Tensor, distance: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel the non-empty cells 0..c-1 and, on incomplete grids (c < budget), split off singletons.

    cell, distance: (n,) long, n >= budget. Each split takes the largest group (ties: lowest label)
    and moves its token farthest from the centre (ties: the later token) into a new group of its
    own, until there are exactly `budget` groups. Full grids need no split.
    """
    _, cell = torch.unique(cell, return_inverse=True)
    count = int(cell.max()) + 1
    if count >= budget:
        return cell, distance
    cell, distance = cell.clone(), distance.clone()
    index = torch.arange(cell.numel(), device=cell.device)
    for label in range(count, budget):
        sizes = torch.bincount(cell, minlength=label)
        largest = int(torch.argmax(sizes))
        members = index[cell == largest]
        far = members[distance[members] == distance[members].max()][-1]
        cell[far] = label
        distance[far] = 0
    return cell, distance


@dataclass
class PoolPrune(Method):
    """Average-pool each media item's visual grid to the budget (a merger; see module docstring).

    keep: fraction in (0, 1] or count per media item (None: set by `apply()`).
    layer: 0 = pre-LLM on the projected embeddings (default); k = on the hidden states at layer k.
    """

    keep: float | int | None = None
    layer: int = 0
    name = "pool"

    def select(self, ctx: SelectionContext) -> Selection | torch.Tensor:
        layout = ctx.layout

        def choose(members: torch.Tensor, budget: int) -> Selection:
            item = int(layout.media_index[members[0]])
            grid = layout.media_grid[item] if item < len(layout.media_grid) else None
            return pool_grid(ctx.visual_features[members], layout.grid_thw[members], grid, budget)

        return per_media(ctx, choose)


register("pool", PoolPrune, "Average-pool each media grid (per frame) to the budget; tokens keep positions.")

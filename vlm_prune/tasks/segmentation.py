"""The segmentation task: easy-VQA mosaics with referring and reasoning prompts, masks from the shapes' own pixels.

Source data: the mosaic task's easy-VQA cells (`vlm_prune.data.mosaic`; train mosaics from train images only, test
mosaics from test images only). A cell's mask is its shape's pixels: those that differ from the cell image's own
background (the median of its four corners) by more than `FG_THRESHOLD` in some channel.

Prompt kinds (`kind`), each with exactly one target shape in the mosaic:

    referring_name      "segment the red circle"                                  (colour + shape unique)
    referring_position  "segment the shape in the bottom left"
    same_color          "segment the shape that has the same color as the triangle" (one triangle, one colour mate)
    odd_one_out         "segment the only shape that is not a circle"             (all other shapes are circles)

The answer is "[SEG]." (LISA's teacher-forced evaluation appends it to the prompt).

Metrics (LISA's definitions): gIoU = the mean of per-mask IoU (an empty prediction of an empty target counts 1),
cIoU = (sum of intersections) / (sum of unions) over the whole set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlm_prune.data.mosaic import CELL_PX, COLORS, SHAPES, Cell, DataError, compose_mosaic, load_cells, position_name

FG_THRESHOLD = 40
KINDS = ("referring_name", "referring_position", "same_color", "odd_one_out")
ANSWER = "[SEG]."


# ------------------------------------------------------------------------------------------------ metrics
def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(|P and T|, |P or T|) of two (H, W) bool masks."""
    if pred.shape != target.shape:
        raise DataError(f"mask shapes differ: prediction {tuple(pred.shape)}, target {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    return int((pred & target).sum()), int((pred | target).sum())


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    intersection, union = intersection_union(pred, target)
    return 1.0 if union == 0 else intersection / union


def giou_ciou(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> dict[str, float]:
    """{"giou": mean per-mask IoU, "ciou": sum I / sum U} over paired (H, W) masks."""
    if len(preds) != len(targets) or not preds:
        raise DataError(f"need as many predictions as targets (got {len(preds)} and {len(targets)}), at least one")
    pairs = [intersection_union(p, t) for p, t in zip(preds, targets)]
    total_i, total_u = sum(i for i, _ in pairs), sum(u for _, u in pairs)
    gious = [1.0 if u == 0 else i / u for i, u in pairs]
    return {"giou": float(np.mean(gious)), "ciou": 1.0 if total_u == 0 else total_i / total_u}


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class SegSample:
    """One mosaic, one prompt, one target mask. mask: (H, W) bool over the mosaic; target: its cell index."""

    image: Image.Image
    mask: torch.Tensor
    prompt: str
    kind: str
    target: int
    cells: tuple[Cell, ...]
    grid: int
    split: str
    answer: str = ANSWER


def shape_mask(cell: Cell) -> np.ndarray:
    """(64, 64) bool: the pixels of the cell's shape (off its own background)."""
    with Image.open(cell.path) as image:
        px = np.asarray(image.convert("RGB").resize((CELL_PX, CELL_PX)), dtype=np.int16)
    background = np.median(np.stack([px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]]), axis=0)
    return np.abs(px - background).max(-1) > FG_THRESHOLD


def mosaic_mask(cells: Sequence[Cell], target: int, grid: int) -> torch.Tensor:
    """(grid*64, grid*64) bool: the target cell's shape at its place in the mosaic."""
    out = np.zeros((grid * CELL_PX, grid * CELL_PX), dtype=bool)
    row, col = divmod(target, grid)
    out[row * CELL_PX : (row + 1) * CELL_PX, col * CELL_PX : (col + 1) * CELL_PX] = shape_mask(cells[target])
    return torch.from_numpy(out)


def prompt_for(kind: str, cells: Sequence[Cell], grid: int, rng: random.Random) -> tuple[str, int] | None:
    """(prompt, target cell) of `kind` for this layout, or None when the layout has no unambiguous one."""
    n = len(cells)
    if kind == "referring_name":
        names = [(c.color, c.shape) for c in cells]
        unique = [i for i in range(n) if names.count(names[i]) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        return f"segment the {cells[target].color} {cells[target].shape}", target
    if kind == "referring_position":
        target = rng.randrange(n)
        return f"segment the shape in the {position_name(target, grid)}", target
    if kind == "same_color":
        options = []
        for shape in SHAPES:
            anchors = [i for i in range(n) if cells[i].shape == shape]
            if len(anchors) != 1:
                continue
            mates = [i for i in range(n) if i != anchors[0] and cells[i].color == cells[anchors[0]].color]
            if len(mates) == 1:
                options.append((shape, mates[0]))
        if not options:
            return None
        shape, target = rng.choice(options)
        return f"segment the shape that has the same color as the {shape}", target
    if kind == "odd_one_out":
        for shape in SHAPES:
            others = [i for i in range(n) if cells[i].shape != shape]
            if len(others) == 1:
                return f"segment the only shape that is not a {shape}", others[0]
        return None
    raise DataError(f"unknown prompt kind {kind!r}; choose one of {KINDS}")


def _layout_for(kind: str, pool: Sequence[Cell], grid: int, rng: random.Random) -> tuple[Cell, ...]:
    """A layout that admits `kind`: odd_one_out and same_color layouts are built, the others drawn."""
    n = grid * grid
    by_shape = {s: [c for c in pool if c.shape == s] for s in SHAPES}
    if kind == "odd_one_out":
        common = rng.choice(SHAPES)
        odd = rng.choice([s for s in SHAPES if s != common])
        cells = rng.sample(by_shape[common], n - 1) + [rng.choice(by_shape[odd])]
        rng.shuffle(cells)
        return tuple(cells)
    return tuple(pool[i] for i in rng.sample(range(len(pool)), n))


def make_samples(split: str, n: int, seed: int = 0, grid: int = 2, kinds: Sequence[str] = KINDS) -> list[SegSample]:
    """`n` samples of `split`, prompt kinds cycling through `kinds`; a pure function of its arguments."""
    pool = load_cells(split)
    rng = random.Random(f"segmentation/{split}/{grid}/{seed}")
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        for _ in range(200):
            cells = _layout_for(kind, pool, grid, rng)
            found = prompt_for(kind, cells, grid, rng)
            if found is not None:
                break
        else:
            raise DataError(f"no {grid}x{grid} layout admits a {kind!r} prompt after 200 draws")
        prompt, target = found
        image = compose_mosaic(cells, grid)
        out.append(SegSample(image, mosaic_mask(cells, target, grid), prompt, kind, target, cells, grid, split))
    return out


def task_words() -> list[str]:
    """Every word the prompts use (for tokenizers of the embedded demo models)."""
    words = {"segment", "the", "shape", "in", "that", "has", "same", "color", "as", "only", "is", "not", "a"}
    words |= set(SHAPES) | set(COLORS)
    words |= {w for i in range(9) for w in position_name(i, 3).split()}
    words |= {w for i in range(4) for w in position_name(i, 2).split()}
    return sorted(words)

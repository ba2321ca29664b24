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

    @property
    def qtype(self) -> str:
        """The prompt kind (what the bench groups by)."""
        return self.kind

    @property
    def question(self) -> str:
        return self.prompt


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


# ------------------------------------------------------------------------------------------------ bench
SAM_MEAN, SAM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SamImageProcessor's defaults (ImageNet)


def sam_pixel_values(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size): the images resized (bilinear) to SAM's square input and normalised as SAM's processor."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(SAM_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAM_STD).view(1, 3, 1, 1)


def teacher_forced_inputs(model, processor, samples: Sequence[SegSample]):
    """The left-padded VLM inputs of the prompts with the answer "[SEG]." appended (LISA's evaluation)."""
    from vlm_prune.demo import prepare_inputs
    from vlm_prune.models.segmenter import Segmenter, SegTokenError

    inputs = prepare_inputs(model, processor, [s.image for s in samples], [s.prompt for s in samples])
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer(ANSWER, add_special_tokens=False, return_tensors="pt").input_ids.to(inputs["input_ids"].device)
    seg_id = Segmenter.of(model).config.seg_token_id
    if not bool((answer == seg_id).any()):
        raise SegTokenError(f"the tokenizer does not encode {ANSWER!r} with the [SEG] id {seg_id}; add [SEG] to it")
    tail = answer.expand(inputs["input_ids"].shape[0], -1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    return inputs


def score_samples(model, processor, samples: Sequence[SegSample]) -> list[dict]:
    """Per sample {"score": IoU, "intersection", "union"} of the teacher-forced mask of the Segmenter built on
    `model` (`Segmenter.of`). A pruning LVLM_CSP without a query token is pointed at `[SEG]`."""
    from vlm_prune.methods.lvlm_csp import LVLMCSP
    from vlm_prune.models.segmenter import Segmenter, _active_handle

    segmenter = Segmenter.of(model)
    handle = _active_handle(model)
    for method in [] if handle is None else handle.methods:
        if isinstance(method, LVLMCSP) and method.query_token_id is None:
            method.query_token_id = segmenter.config.seg_token_id
    inputs = dict(teacher_forced_inputs(model, processor, samples))
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    size = segmenter.sam.config.vision_config.image_size
    sam = sam_pixel_values([s.image for s in samples], size).to(input_ids.device)
    masks = segmenter.predict_masks(
        input_ids, sam, attention_mask=attention_mask, output_size=tuple(samples[0].mask.shape), **inputs
    )
    out = []
    for predicted, sample in zip(masks, samples):
        intersection, union = intersection_union(predicted[0].cpu(), sample.mask)
        out.append({"score": 1.0 if union == 0 else intersection / union, "intersection": intersection, "union": union})
    return out


def pooled_scores(scored: Sequence[dict]) -> dict[str, float]:
    """{"ciou": sum I / sum U} over the scored samples (their mean "score" is the gIoU)."""
    union = sum(s["union"] for s in scored)
    return {"ciou": 1.0 if union == 0 else sum(s["intersection"] for s in scored) / union}


def load_bench_segmenter(spec: str, dtype=torch.float32, device: str = "cpu"):
    """(the segmenter's VLM, its processor, info) for `bench --task segmentation --model DIR` (a saved Segmenter
    whose `vlm/` folder holds the processor too)."""
    from pathlib import Path

    from vlm_prune.demo import load_processor
    from vlm_prune.models.segmenter import Segmenter

    path = Path(spec).expanduser()
    embedded = Path(__file__).resolve().parent.parent / "demo_models" / spec
    if not (path / "segmenter_config.json").exists() and (embedded / "segmenter_config.json").exists():
        path = embedded  # an embedded demo segmenter by name
    if not (path / "segmenter_config.json").exists():
        raise DataError(
            f"{spec!r} is not a saved Segmenter (no segmenter_config.json); the segmentation task needs one: "
            "Segmenter.save_pretrained(dir, processor=...) or benchmarks/train_segmenter.py"
        )
    segmenter = Segmenter.from_pretrained(path, dtype=dtype).to(device).eval()
    return segmenter.vlm, load_processor(path / "vlm"), {"spec": str(spec), "source": "segmenter"}

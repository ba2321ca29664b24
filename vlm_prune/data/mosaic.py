"""The mosaic task: grids of easy-VQA shapes with questions about one cell or the whole image.

Source data
    The `easy-vqa` PyPI package (``pip install easy-vqa``) ships 64x64 RGB images of one coloured shape
    on a light background, with its own train split (4000 images) and test split (1000 images) and
    questions/answers about each image. Every image holds exactly one shape (circle, rectangle or
    triangle) in one of 8 colours (red, green, blue, yellow, teal, brown, gray, black).

Labels
    A cell's (shape, colour) label is read from the dataset's own questions and answers, never from
    the pixels: "what color is the shape?" -> blue gives the colour, "what shape is in the image?" ->
    circle gives the shape, and yes/no questions ("is there not a red shape?" -> no) confirm or exclude
    values. An image is kept when its answers name exactly one shape and one colour (a value excluded
    by every other option also counts). Images whose questions never pin down one of the two are
    dropped: 3578 of 4000 train and 888 of 1000 test images are kept.

Mosaics
    A mosaic is a `grid` x `grid` grid of distinct easy-VQA images of ONE split, pasted at 64 px per cell
    (default 3x3 = 192x192 px). Cells are numbered row-major from the top left. Train mosaics use only
    train images and test mosaics only test images, so no test image is ever seen in training.

Question types (`qtype`)
    ``color``  (cell)  "what color is the shape in the top left?"        -> a colour
    ``shape``  (cell)  "what shape is in the middle?"                    -> circle / rectangle / triangle
    ``yesno``  (cell)  "is there a triangle in the bottom right?" or
                       "is there a red shape in the top middle?"        -> yes / no (balanced 50/50)
    ``count``  (image) "how many circles are there?" or
                       "how many red shapes are there?"                  -> a number written in digits

    Cell positions of a 3x3 grid are named top left, top middle, top right, middle left, middle,
    middle right, bottom left, bottom middle, bottom right; a 2x2 grid uses the four corners; other
    grids say "row R column C" (1-based). Every answer is one word.

Determinism
    `make_mosaics(split, n, seed, grid)` is a pure function of its arguments: it draws from a
    `random.Random` seeded with a string of (split, grid, seed), so it gives the same samples in every
    process and on every machine, and the first k samples of a call with n > k equal a call with n = k.
    Question types cycle through `qtypes` in order, so any n divisible by 4 is balanced over types.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import PruneError

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
QTYPES: tuple[str, ...] = ("color", "shape", "yesno", "count")
CELL_QTYPES: tuple[str, ...] = ("color", "shape", "yesno")
SPLITS: tuple[str, ...] = ("train", "test")
CELL_PX = 64

_NAMES_3 = (
    "top left", "top middle", "top right",
    "middle left", "middle", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
_NAMES_2 = ("top left", "top right", "bottom left", "bottom right")


class DataError(PruneError, ValueError):
    """Bad arguments to the mosaic task, or the easy-vqa package is missing."""


@dataclass(frozen=True)
class Cell:
    """One easy-VQA image and its labels."""

    split: str
    image_id: int
    shape: str
    color: str
    path: str


@dataclass(frozen=True)
class QuestionSpec:
    """One question template instance. `cell` is None for whole-image questions."""

    qtype: str
    cell: int | None = None
    kind: str | None = None  # "shape" / "color" for yesno and count questions
    value: str | None = None

    def text(self, grid: int = 3) -> str:
        if self.qtype == "color":
            return f"what color is the shape in the {position_name(self.cell, grid)}?"
        if self.qtype == "shape":
            return f"what shape is in the {position_name(self.cell, grid)}?"
        if self.qtype == "yesno":
            what = self.value if self.kind == "shape" else f"{self.value} shape"
            return f"is there a {what} in the {position_name(self.cell, grid)}?"
        if self.qtype == "count":
            what = f"{self.value}s" if self.kind == "shape" else f"{self.value} shapes"
            return f"how many {what} are there?"
        raise DataError(f"unknown question type {self.qtype!r}; expected one of {QTYPES}")

    def answer(self, cells: Sequence[Cell]) -> str:
        if self.qtype == "color":
            return cells[self.cell].color
        if self.qtype == "shape":
            return cells[self.cell].shape
        if self.qtype == "yesno":
            return "yes" if getattr(cells[self.cell], self.kind) == self.value else "no"
        if self.qtype == "count":
            return str(sum(getattr(c, self.kind) == self.value for c in cells))
        raise DataError(f"unknown question type {self.qtype!r}; expected one of {QTYPES}")


@dataclass
class MosaicSample:
    """One mosaic with one question. `cells` are row-major from the top left."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    cells: tuple[Cell, ...]
    spec: QuestionSpec
    grid: int = 3
    split: str = "test"

    @property
    def is_cell_question(self) -> bool:
        return self.qtype in CELL_QTYPES


def position_name(index: int, grid: int = 3) -> str:
    """Name of cell `index` (row-major) in a `grid` x `grid` mosaic."""
    if not 0 <= index < grid * grid:
        raise DataError(f"cell {index} is outside a {grid}x{grid} grid")
    if grid == 3:
        return _NAMES_3[index]
    if grid == 2:
        return _NAMES_2[index]
    return f"row {index // grid + 1} column {index % grid + 1}"


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "the mosaic task needs the `easy-vqa` package: pip install easy-vqa (or pip install 'vlm-prune[bench]')"
        ) from e
    return easy_vqa


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")


def _labels_from_questions(texts, answers, image_ids) -> dict[int, tuple[str, str]]:
    """(shape, color) per image id, read from easy-VQA's own questions and answers."""
    values = set(SHAPES) | set(COLORS)
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for text, ans, iid in zip(texts, answers, image_ids, strict=True):
        words = re.findall(r"[a-z]+", text.lower())
        named = [w for w in words if w in values]
        if ans in values:  # "what color is the triangle?" -> red: red and triangle are both present
            present.setdefault(iid, set()).update([ans, *named])
        elif ans in ("yes", "no"):
            negated = "not" in words or "no" in words
            is_present = (ans == "yes") != negated
            (present if is_present else absent).setdefault(iid, set()).update(named)
    labels = {}
    for iid, pos in present.items():
        neg = absent.get(iid, set())
        if pos & neg:
            continue
        out = []
        for options in (SHAPES, COLORS):
            found = [v for v in options if v in pos]
            if not found:
                found = [v for v in options if v not in neg]
            if len(found) != 1:
                break
            out.append(found[0])
        else:
            labels[iid] = (out[0], out[1])
    return labels


@functools.cache
def load_cells(split: str) -> tuple[Cell, ...]:
    """All labelled easy-VQA images of one split, sorted by image id."""
    _check_split(split)
    ev = _easy_vqa()
    texts, answers, ids = getattr(ev, f"get_{split}_questions")()
    paths = getattr(ev, f"get_{split}_image_paths")()
    labels = _labels_from_questions(texts, answers, ids)
    return tuple(Cell(split, iid, *labels[iid], paths[iid]) for iid in sorted(paths) if iid in labels)


@functools.lru_cache(maxsize=8192)
def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (CELL_PX, CELL_PX, 3):
        arr = np.asarray(Image.fromarray(arr).resize((CELL_PX, CELL_PX), Image.BICUBIC), dtype=np.uint8)
    return arr


def load_cell_pixels(split: str) -> np.ndarray:
    """uint8 array (N, 64, 64, 3) of every image of `load_cells(split)`, in the same order."""
    return np.stack([_pixels(c.path) for c in load_cells(split)])


def compose_mosaic(cells: Sequence[Cell], grid: int = 3) -> Image.Image:
    """Paste `grid*grid` cells (row-major) into one RGB image of 64*grid px per side."""
    if len(cells) != grid * grid:
        raise DataError(f"a {grid}x{grid} mosaic needs {grid * grid} cells, got {len(cells)}")
    tiles = np.stack([_pixels(c.path) for c in cells]).reshape(grid, grid, CELL_PX, CELL_PX, 3)
    return Image.fromarray(tiles.transpose(0, 2, 1, 3, 4).reshape(grid * CELL_PX, grid * CELL_PX, 3))


def sample_question(rng: random.Random, cells: Sequence[Cell], grid: int, qtype: str) -> QuestionSpec:
    """Draw one question of type `qtype` about a mosaic (the rule `make_mosaics` uses)."""
    if qtype in ("color", "shape"):
        return QuestionSpec(qtype, cell=rng.randrange(grid * grid))
    if qtype == "yesno":
        cell = rng.randrange(grid * grid)
        kind = rng.choice(("shape", "color"))
        options = SHAPES if kind == "shape" else COLORS
        truth = getattr(cells[cell], kind)
        value = truth if rng.random() < 0.5 else rng.choice([v for v in options if v != truth])
        return QuestionSpec("yesno", cell=cell, kind=kind, value=value)
    if qtype == "count":
        kind = rng.choice(("shape", "color"))
        value = rng.choice(SHAPES if kind == "shape" else COLORS)
        return QuestionSpec("count", kind=kind, value=value)
    raise DataError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def sample_layout(rng: random.Random, pool: Sequence[Cell], grid: int) -> tuple[Cell, ...]:
    """Draw `grid*grid` distinct cells from `pool` (the rule `make_mosaics` uses)."""
    if len(pool) < grid * grid:
        raise DataError(f"a pool of {len(pool)} images cannot fill a {grid}x{grid} mosaic")
    return tuple(pool[i] for i in rng.sample(range(len(pool)), grid * grid))


def make_mosaics(
    split: str, n: int, seed: int = 0, grid: int = 3, qtypes: Sequence[str] = QTYPES
) -> list[MosaicSample]:
    """`n` mosaics of `split` ("train" or "test") with one question each; deterministic in `seed`.

    Question types cycle through `qtypes` in order. See the module docstring for the task.
    """
    _check_split(split)
    if grid < 1:
        raise DataError(f"grid must be >= 1, got {grid}")
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    qtypes = tuple(qtypes)
    bad = [q for q in qtypes if q not in QTYPES]
    if bad or not qtypes:
        raise DataError(f"unknown question types {bad}; expected a non-empty subset of {QTYPES}")
    pool = load_cells(split)
    rng = random.Random(f"vlm_prune.mosaic/{split}/grid={grid}/seed={seed}")
    out = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        cells = sample_layout(rng, pool, grid)
        spec = sample_question(rng, cells, grid, qtype)
        out.append(
            MosaicSample(
                image=compose_mosaic(cells, grid),
                question=spec.text(grid),
                answer=spec.answer(cells),
                qtype=qtype,
                cells=cells,
                spec=spec,
                grid=grid,
                split=split,
            )
        )
    return out


def question_specs(grid: int = 3) -> list[QuestionSpec]:
    """Every question the task can ask about a `grid` x `grid` mosaic."""
    specs: list[QuestionSpec] = []
    for cell in range(grid * grid):
        specs.append(QuestionSpec("color", cell=cell))
        specs.append(QuestionSpec("shape", cell=cell))
        specs.extend(QuestionSpec("yesno", cell=cell, kind="shape", value=v) for v in SHAPES)
        specs.extend(QuestionSpec("yesno", cell=cell, kind="color", value=v) for v in COLORS)
    specs.extend(QuestionSpec("count", kind="shape", value=v) for v in SHAPES)
    specs.extend(QuestionSpec("count", kind="color", value=v) for v in COLORS)
    return specs


def task_corpus(grid: int = 3) -> list[str]:
    """All question texts and answers of the task (e.g. to train a tokenizer)."""
    answers = [*SHAPES, *COLORS, "yes", "no", *(str(k) for k in range(grid * grid + 1))]
    return [s.text(grid) for s in question_specs(grid)] + answers


def easy_vqa_dir() -> str:
    """Folder of the installed easy-vqa package (for tools that must copy its data)."""
    return os.path.dirname(_easy_vqa().__file__)

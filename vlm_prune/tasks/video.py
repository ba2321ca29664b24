"""The video task: short clips of easy-VQA shapes that appear, move and change colour, with questions that need time.

Source data
    The easy-VQA images and their (shape, colour) labels of `vlm_prune.data.mosaic` (`load_cells`, read from the
    dataset's own questions). Train clips use only easy-VQA train images and test clips only test images.

Clips
    A clip is a `grid` x `grid` board (default 2x2) of cells of `cell_px` pixels (default 32) on one static
    background colour (the background of one easy-VQA image of the split). It has `STEPS` = 4 states; each state
    is shown for `frames_per_step` identical frames (default 2, so a clip has 8 frames and every state fills
    exactly one Qwen2-VL temporal patch of 2 frames). A shape is the foreground of an easy-VQA image (pixels that
    differ from that image's own background by more than 40 in some channel) pasted onto the background,
    cut out around its bounding box and resized so that its longest side is 0.8 of the cell (easy-VQA shapes
    span 10-32 of 64 px; at their own size most would cover a few pixels of a 32 px cell).

    State 0 holds one or two shapes. Each later state follows from the one before by exactly one event:
      ``appear``   a new shape appears in an empty cell;
      ``move``     a shape leaves its cell for an empty one (same image);
      ``recolor``  a shape present from the start is replaced by another image of the same shape and a
                   different colour (same cell).
    The three events of a clip are one of the multisets (appear, appear, move), (appear, appear, recolor),
    (appear, move, recolor), in a random order.

Question types (`qtype`), one-word answers
    ``appeared_last``  "what color is the shape that appeared last?"   -> a colour
    ``moved``          "which shape moved?"                           -> circle / rectangle / triangle
    ``recolored``      "which shape changed color?"                   -> circle / rectangle / triangle
    ``start``          "what is in the top left at the start?"        -> a shape or ``nothing``
    ``end``            "what is in the top left at the end?"          -> a shape or ``nothing``
    ``start``/``end`` ask about an occupied cell half of the time when there is one (cells are named as in
    the mosaic task: the four corners of a 2x2 board). A sample of type ``moved`` / ``recolored`` is drawn
    from a template with that event; the other types from any template.

Determinism
    `make_clips(split, n, seed, ...)` is a pure function of its arguments (a `random.Random` seeded with a
    string of them); the first k samples of a call with n > k equal a call with n = k. Question types cycle
    through `qtypes` in order, so any n divisible by len(qtypes) is balanced over types.

Inputs for Qwen2-VL video are built by `vlm_prune.tasks.video_processing` (re-exported here): `video_inputs`,
`generate_answers`, `score`, `evaluate`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.mosaic import COLORS, SHAPES, Cell, DataError, _pixels, load_cells, position_name

QTYPES: tuple[str, ...] = ("appeared_last", "moved", "recolored", "start", "end")
EVENT_KINDS: tuple[str, ...] = ("appear", "move", "recolor")
TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("appear", "appear", "move"),
    ("appear", "appear", "recolor"),
    ("appear", "move", "recolor"),
)
NEEDS_EVENT = {"moved": "move", "recolored": "recolor", "appeared_last": "appear"}
STEPS = 4  # states per clip: the start and one per event
SOURCE_PX = 64  # easy-VQA image side
NOTHING = "nothing"
SHAPE_FILL = 0.8  # a shape's longest side as a share of its cell
FG_THRESHOLD = 40  # a pixel is shape when it differs from its image's background by more than this in a channel

_QUESTIONS = {
    "appeared_last": "what color is the shape that appeared last?",
    "moved": "which shape moved?",
    "recolored": "which shape changed color?",
    "start": "what is in the {pos} at the start?",
    "end": "what is in the {pos} at the end?",
}


@dataclass(frozen=True)
class Event:
    """One change between state `step - 1` and state `step`.

    `cell` is where the change shows (appear / recolor: that cell; move: the destination), `image` the
    shape shown there from `step` on, `source` the cell a move leaves (-1 otherwise) and `before` the image a
    recolor replaces (None otherwise)."""

    step: int
    kind: str
    cell: int
    image: Cell
    source: int = -1
    before: Cell | None = None


@dataclass(frozen=True)
class VideoClip:
    """A clip as its start state and its events (everything else is derived from these)."""

    start: tuple[Cell | None, ...]
    events: tuple[Event, ...]
    background: tuple[int, int, int]
    split: str
    grid: int = 2
    cell_px: int = 32
    frames_per_step: int = 2

    @property
    def num_frames(self) -> int:
        return STEPS * self.frames_per_step

    def states(self) -> list[tuple[Cell | None, ...]]:
        """The board at each of the `STEPS` states (row-major cells, None = empty)."""
        board = list(self.start)
        out = [tuple(board)]
        for ev in self.events:
            if ev.kind == "move":
                board[ev.source] = None
            board[ev.cell] = ev.image
            out.append(tuple(board))
        return out

    def video(self) -> np.ndarray:
        """uint8 array (num_frames, H, W, 3), H = W = grid * cell_px."""
        frames = [render_state(s, self.background, self.grid, self.cell_px) for s in self.states()]
        return np.repeat(np.stack(frames), self.frames_per_step, axis=0)


@dataclass
class VideoSample:
    """One clip with one question. `video` is (frames, H, W, 3) uint8; `cell` the asked cell (or -1)."""

    video: np.ndarray
    question: str
    answer: str
    qtype: str
    clip: VideoClip
    cell: int = -1

    @property
    def frames(self) -> list[Image.Image]:
        return [Image.fromarray(f) for f in self.video]

    @property
    def split(self) -> str:
        return self.clip.split


# ------------------------------------------------------------------------------------------------ rendering
@functools.lru_cache(maxsize=8192)
def _image_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (64, 64, 3) uint8, shape mask (64, 64) bool) of one easy-VQA image."""
    px = _pixels(path)
    corners = np.stack([px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]]).astype(np.int16)
    bg = np.median(corners, axis=0).astype(np.int16)  # the image's own background
    return px, np.abs(px.astype(np.int16) - bg).max(-1) > FG_THRESHOLD


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0, SOURCE_PX, 0, SOURCE_PX
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@functools.lru_cache(maxsize=4096)
def _cell_pixels(path: str, background: tuple[int, int, int], cell_px: int) -> np.ndarray:
    px, mask = _image_arrays(path)
    bg = np.asarray(background, dtype=np.uint8)
    pad = SOURCE_PX
    canvas = np.empty((3 * SOURCE_PX, 3 * SOURCE_PX, 3), dtype=np.uint8)
    canvas[:] = bg
    canvas[pad : pad + SOURCE_PX, pad : pad + SOURCE_PX] = np.where(mask[..., None], px, bg)
    y0, y1, x0, x1 = _bbox(mask)
    half = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / SHAPE_FILL / 2)))
    cy, cx = pad + (y0 + y1) // 2, pad + (x0 + x1) // 2
    crop = canvas[cy - half : cy + half, cx - half : cx + half]
    out = np.asarray(Image.fromarray(crop).resize((cell_px, cell_px), Image.BILINEAR), dtype=np.uint8)
    out.setflags(write=False)
    return out


def render_cell(image: Cell | None, background: Sequence[int], cell_px: int) -> np.ndarray:
    """(cell_px, cell_px, 3) uint8: the shape of `image` on `background` (just background when None).

    The shape is cut out of its easy-VQA image (pixels off that image's background), centred on the middle of
    its bounding box in a square whose side is the box's longest side / `SHAPE_FILL`, and resized (PIL
    bilinear) to the cell: every shape fills the same share of its cell whatever its size in the source."""
    if image is None:
        out = np.empty((cell_px, cell_px, 3), dtype=np.uint8)
        out[:] = np.asarray(background, dtype=np.uint8)
        return out
    return _cell_pixels(image.path, tuple(int(v) for v in background), cell_px)


def render_state(board: Sequence[Cell | None], background: Sequence[int], grid: int, cell_px: int) -> np.ndarray:
    """(grid*cell_px, grid*cell_px, 3) uint8 frame of one board state."""
    tiles = np.stack([render_cell(c, background, cell_px) for c in board])
    return (
        tiles.reshape(grid, grid, cell_px, cell_px, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(grid * cell_px, grid * cell_px, 3)
    )


# ------------------------------------------------------------------------------------------------ sampling
def sample_clip(
    rng: random.Random,
    split: str,
    grid: int = 2,
    cell_px: int = 32,
    frames_per_step: int = 2,
    template: Sequence[str] | None = None,
) -> VideoClip:
    """Draw one clip (the rule `make_clips` uses); `template` None draws one of `TEMPLATES`."""
    pool = load_cells(split)
    template = tuple(template) if template is not None else rng.choice(TEMPLATES)
    n_cells = grid * grid
    n_appear = template.count("appear")
    n_start = 1 if n_appear + ("move" in template) >= n_cells - 1 else rng.choice((1, 2))
    images = iter(rng.sample(range(len(pool)), n_start + n_appear + 4))
    occupied = rng.sample(range(n_cells), n_start)
    board: list[Cell | None] = [None] * n_cells
    for c in occupied:
        board[c] = pool[next(images)]
    start = tuple(board)
    starters = {c.image_id for c in start if c is not None}
    order = list(template)
    rng.shuffle(order)
    events = []
    for step, kind in enumerate(order, start=1):
        empty = [i for i, c in enumerate(board) if c is None]
        full = [i for i, c in enumerate(board) if c is not None]
        if kind == "appear":
            cell = rng.choice(empty)
            ev = Event(step, kind, cell, pool[next(images)])
        elif kind == "move":
            src = rng.choice(full)
            ev = Event(step, kind, rng.choice(empty), board[src], source=src)
        elif kind == "recolor":
            cell = rng.choice([i for i in full if board[i].image_id in starters])
            old = board[cell]
            options = _same_shape_other_color(split, old.shape, old.color)
            ev = Event(step, kind, cell, pool[rng.choice(options)], before=old)
        else:
            raise DataError(f"unknown event {kind!r}; expected one of {EVENT_KINDS}")
        if ev.kind == "move":
            board[ev.source] = None
        board[ev.cell] = ev.image
        events.append(ev)
    bg_cell = pool[next(images)]
    background = tuple(int(v) for v in _pixels(bg_cell.path)[0, 0])
    return VideoClip(start, tuple(events), background, split, grid, cell_px, frames_per_step)


@functools.cache
def _same_shape_other_color(split: str, shape: str, color: str) -> tuple[int, ...]:
    return tuple(i for i, c in enumerate(load_cells(split)) if c.shape == shape and c.color != color)


def question_text(qtype: str, cell: int = -1, grid: int = 2) -> str:
    if qtype not in _QUESTIONS:
        raise DataError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    if qtype in ("start", "end"):
        return _QUESTIONS[qtype].format(pos=position_name(cell, grid))
    return _QUESTIONS[qtype]


def answer(clip: VideoClip, qtype: str, cell: int = -1) -> str:
    """The one-word answer of question (`qtype`, `cell`) about `clip`."""
    if qtype in ("start", "end"):
        c = clip.states()[0 if qtype == "start" else -1][cell]
        return NOTHING if c is None else c.shape
    kind = NEEDS_EVENT.get(qtype)
    if kind is None:
        raise DataError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    evs = [e for e in clip.events if e.kind == kind]
    if not evs:
        raise DataError(f"question {qtype!r} needs a clip with a {kind!r} event")
    return evs[-1].image.color if qtype == "appeared_last" else evs[-1].image.shape


def answerable(clip: VideoClip) -> list[tuple[str, int]]:
    """Every (qtype, cell) question `clip` can answer (cell -1 for clip-level questions)."""
    kinds = {e.kind for e in clip.events}
    out = [(q, -1) for q, k in NEEDS_EVENT.items() if k in kinds]
    n = clip.grid * clip.grid
    return out + [(q, c) for q in ("start", "end") for c in range(n)]


def sample_cell(rng: random.Random, clip: VideoClip, qtype: str) -> int:
    """The asked cell of a start/end question: an occupied one half of the time when there is one."""
    board = clip.states()[0 if qtype == "start" else -1]
    full = [i for i, c in enumerate(board) if c is not None]
    empty = [i for i, c in enumerate(board) if c is None]
    if full and (not empty or rng.random() < 0.5):
        return rng.choice(full)
    return rng.choice(empty)


def make_clips(
    split: str,
    n: int,
    seed: int = 0,
    grid: int = 2,
    cell_px: int = 32,
    frames_per_step: int = 2,
    qtypes: Sequence[str] = QTYPES,
) -> list[VideoSample]:
    """`n` clips of `split` ("train" or "test") with one question each; deterministic in the arguments.

    Question types cycle through `qtypes`. See the module docstring for the task."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if grid != 2:
        raise DataError(f"the video task uses a 2x2 board (grid=2), got grid={grid}")
    if frames_per_step < 1:
        raise DataError(f"frames_per_step must be >= 1, got {frames_per_step}")
    qtypes = tuple(qtypes)
    bad = [q for q in qtypes if q not in QTYPES]
    if bad or not qtypes:
        raise DataError(f"unknown question types {bad}; expected a non-empty subset of {QTYPES}")
    rng = random.Random(f"vlm_prune.video/{split}/grid={grid}/px={cell_px}/fps={frames_per_step}/seed={seed}")
    out = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        kind = NEEDS_EVENT.get(qtype)
        options = [t for t in TEMPLATES if kind is None or kind in t]
        clip = sample_clip(rng, split, grid, cell_px, frames_per_step, template=rng.choice(options))
        cell = sample_cell(rng, clip, qtype) if qtype in ("start", "end") else -1
        out.append(
            VideoSample(
                video=clip.video(),
                question=question_text(qtype, cell, grid),
                answer=answer(clip, qtype, cell),
                qtype=qtype,
                clip=clip,
                cell=cell,
            )
        )
    return out


def eval_samples(n: int = 200, seed: int = 1234, **kwargs) -> list[VideoSample]:
    """Held-out test clips (easy-VQA test images only): `make_clips("test", n, seed, **kwargs)`."""
    return make_clips("test", n, seed=seed, **kwargs)


def task_words() -> list[str]:
    """Every word of the task's questions and answers (to extend a word-level tokenizer)."""
    words = {w for q in QTYPES for c in range(4) for w in question_text(q, c).replace("?", " ?").split()}
    return sorted(words | set(SHAPES) | set(COLORS) | {NOTHING})


from .video_processing import (  # noqa: E402
    VideoSettings,
    build_video_prompt,
    evaluate,
    generate_answers,
    preprocess_video,
    score,
    video_inputs,
    video_settings,
)

__all__ = [
    "EVENT_KINDS",
    "NOTHING",
    "QTYPES",
    "STEPS",
    "TEMPLATES",
    "Event",
    "VideoSettings",
    "VideoClip",
    "VideoSample",
    "answer",
    "answerable",
    "build_video_prompt",
    "eval_samples",
    "evaluate",
    "generate_answers",
    "make_clips",
    "preprocess_video",
    "question_text",
    "sample_clip",
    "score",
    "task_words",
    "video_inputs",
    "video_settings",
]

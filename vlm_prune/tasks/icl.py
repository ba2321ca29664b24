"""The in-context learning task: nonce words bound to a visual attribute, learnt from the demonstrations alone.

Source data
    The easy-VQA images and their (shape, colour) labels of `vlm_prune.data.mosaic` (`load_cells`, read from the
    dataset's own questions). Train episodes use only easy-VQA train images and test episodes only test images.

Episodes
    Each episode draws `ways` (default 2) distinct values of one attribute (colour by default, or shape) and binds
    each to a distinct word drawn from `words`, e.g. red -> "dax", blue -> "wug": a fresh random binding per episode,
    so the answer can only come from the context. `shots` demonstrations show an easy-VQA image with its word (the
    values cycle through the ways, in a shuffled order, so 4 shots show each of 2 values twice); the query shows a new
    image of one of the ways' values and asks for its word. With 0 shots the binding is unknowable: accuracy is at
    chance (1 / len(words) for a model that answers with some word of the list).

    The prompt is one user turn built by `vlm_prune.engine.segments.interleaved_prompt` through the processor's chat
    template: ``<image> dax <image> wug ... <image> what is the color ?`` -- each demonstration's word is its
    paired text, which is what CATP aligns stage 1 with.

Words
    `NONCE_WORDS` are made-up words for tokenizers with an open vocabulary. The embedded demo models have a closed
    word-level vocabulary (the mosaic task's words), so the bench uses `DEMO_WORDS`: words of that vocabulary that
    name no colour or shape and answer no mosaic question; bound at random per episode they are nonce labels too.
    The embedded few-shot model `llava_icl` (`benchmarks/train_icl_model.py`, the bench's default for this task) is
    trained on `DEMO_WORDS` episodes of the train split: 4-shot 99.8 %, 0-shot 14.8 % (chance 12.5 %) held out.

Determinism
    `make_episodes(split, n, seed, ...)` is a pure function of its arguments (a `random.Random` seeded with a string
    of them); the first k episodes of a call with n > k equal a call with n = k.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..data.mosaic import COLORS, SHAPES, Cell, DataError, _pixels, load_cells

NONCE_WORDS: tuple[str, ...] = ("dax", "wug", "blick", "fep", "toma", "zib", "kiki", "lorp")
DEMO_WORDS: tuple[str, ...] = ("top", "bottom", "left", "right", "middle", "row", "column", "there")
ATTRIBUTES: tuple[str, ...] = ("color", "shape")
#: the query's question per attribute (words of the demo models' vocabulary too)
QUESTIONS: dict[str, str] = {"color": "what is the color ?", "shape": "what is the shape ?"}


@dataclass(frozen=True)
class IclEpisode:
    """One few-shot episode. `demonstrations` are (cell, word); the query asks for the word of `query`."""

    demonstrations: tuple[tuple[Cell, str], ...]
    query: Cell
    answer: str
    attribute: str
    binding: tuple[tuple[str, str], ...]  # (attribute value, word) of each way
    question: str = QUESTIONS["color"]
    split: str = "test"

    @property
    def qtype(self) -> str:
        return f"{len(self.demonstrations)}-shot"

    @property
    def shots(self) -> int:
        return len(self.demonstrations)

    def images(self) -> list[Image.Image]:
        """The demonstration images then the query image (64 x 64 RGB)."""
        return [cell_image(cell) for cell, _ in self.demonstrations] + [cell_image(self.query)]

    def pairs(self) -> tuple[list[tuple[Image.Image, str]], tuple[Image.Image, str]]:
        """(demonstrations as (image, word), (query image, question)) for `interleaved_prompt`."""
        images = self.images()
        demos = [(image, word) for image, (_, word) in zip(images, self.demonstrations)]
        return demos, (images[-1], self.question)


def cell_image(cell: Cell) -> Image.Image:
    return Image.fromarray(_pixels(cell.path))


@functools.lru_cache(maxsize=8)
def _cells_by_value(split: str, attribute: str) -> dict[str, list[Cell]]:
    values = COLORS if attribute == "color" else SHAPES
    by_value: dict[str, list[Cell]] = {value: [] for value in values}
    for cell in load_cells(split):
        by_value[getattr(cell, attribute)].append(cell)
    return by_value


def make_episodes(
    split: str,
    n: int,
    seed: int = 0,
    *,
    shots: int = 4,
    ways: int = 2,
    attribute: str = "color",
    words: Sequence[str] = NONCE_WORDS,
) -> list[IclEpisode]:
    """`n` episodes of one split (see the module docstring)."""
    if attribute not in ATTRIBUTES:
        raise DataError(f"attribute={attribute!r}; choose one of {ATTRIBUTES}")
    values = COLORS if attribute == "color" else SHAPES
    if not 1 <= ways <= min(len(values), len(words)):
        raise DataError(f"ways={ways}: it must be in 1..{min(len(values), len(words))} for {attribute} and the words")
    if shots < 0:
        raise DataError(f"shots={shots}: it must be >= 0")
    by_value = _cells_by_value(split, attribute)
    usable = [value for value in values if len(by_value[value]) > shots + 1]
    rng = random.Random(f"icl/{split}/{seed}/{shots}/{ways}/{attribute}/{','.join(words)}")
    episodes = []
    for _ in range(int(n)):
        chosen = rng.sample(usable, ways)
        bound = rng.sample(list(words), ways)
        binding = dict(zip(chosen, bound))
        labels = [chosen[i % ways] for i in range(shots)]
        rng.shuffle(labels)
        used: set[int] = set()
        demos = []
        for value in labels:
            cell = rng.choice([c for c in by_value[value] if c.image_id not in used])
            used.add(cell.image_id)
            demos.append((cell, binding[value]))
        value = rng.choice(chosen)
        query = rng.choice([c for c in by_value[value] if c.image_id not in used])
        episodes.append(IclEpisode(tuple(demos), query, binding[value], attribute, tuple(binding.items()), split=split))
    return episodes


def episode_inputs(processor, episodes: Sequence[IclEpisode], device=None, dtype=None):
    """The left-padded processor batch of interleaved prompts (rows may hold different numbers of images)."""
    from vlm_prune.engine.segments import interleaved_prompt

    prompts, images = [], []
    for episode in episodes:
        demos, query = episode.pairs()
        prompt, row_images = interleaved_prompt(processor, demos, query)
        prompts.append(prompt)
        images.extend(row_images)
    tokenizer = getattr(processor, "tokenizer", processor)
    side = getattr(tokenizer, "padding_side", None)
    tokenizer.padding_side = "left"
    try:
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    finally:
        if side is not None:
            tokenizer.padding_side = side
    if device is not None:
        inputs = inputs.to(device)
    if dtype is not None and "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def generate_answers(model, processor, episodes: Sequence[IclEpisode], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers (decoded new tokens) to a batch of episodes."""
    parameter = next(model.parameters())
    inputs = episode_inputs(processor, episodes, device=parameter.device, dtype=parameter.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    return [
        text.strip()
        for text in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def evaluate(model, processor, episodes: Sequence[IclEpisode], batch_size: int = 8, max_new_tokens: int = 2) -> dict:
    """Exact-match accuracy of the first answer word: {"accuracy", "n", "correct", "predictions"}."""
    from vlm_prune.demo import normalize_answer

    episodes = list(episodes)
    predictions: list[str] = []
    for start in range(0, len(episodes), batch_size):
        chunk = episodes[start : start + batch_size]
        predictions += [normalize_answer(a) for a in generate_answers(model, processor, chunk, max_new_tokens)]
    correct = sum(p == normalize_answer(e.answer) for p, e in zip(predictions, episodes))
    return {"accuracy": correct / len(episodes) if episodes else float("nan"), "n": len(episodes), "correct": correct,
            "predictions": predictions}  # fmt: skip


def token_split(stats, query_media: int = -1) -> list[dict[str, int]]:
    """Per row of the last prefill, the visual tokens left on the demonstration images and on the query image.

    stats: a `PruneStats` (`handle.stats`); query_media: the query item (Python indexing, default the last).
    """
    if not stats.stages:
        return []
    out = []
    for counts in stats.stages[-1].tokens_out:
        query = counts[query_media] if counts else 0
        out.append({"demonstration": sum(counts) - query, "query": query})
    return out

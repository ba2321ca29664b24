"""Hooks of the vlm_prune_icl lmms-eval task: episodes rebuilt from `vlm_prune.tasks.icl.make_episodes` with the
bench's settings (4 shots, `DEMO_WORDS`), prompts interleaved as `tasks.icl.episode_inputs` builds them (through
the plugin), scored as `tasks.icl.evaluate` scores (first word, lower case)."""

from __future__ import annotations

import functools

from vlm_prune.demo import normalize_answer
from vlm_prune.integrations.lmms_eval import IMAGE_MARK
from vlm_prune.tasks import icl as I

SHOTS = 4


@functools.lru_cache(maxsize=8)
def _episodes(split: str, n: int, seed: int) -> tuple:
    return tuple(I.make_episodes(split, n, seed=seed, shots=SHOTS, words=I.DEMO_WORDS))


def _episode(doc: dict) -> I.IclEpisode:
    episode = _episodes(doc["split"], int(doc["n"]), int(doc["seed"]))[int(doc["index"])]
    if episode.answer != doc["answer"] or episode.question != doc["question"]:
        raise ValueError(f"row {doc['index']} does not match make_episodes{(doc['split'], doc['n'], doc['seed'])}")
    return episode


def _parts(doc: dict) -> list[tuple]:
    demos, query = _episode(doc).pairs()
    return [*demos, query]


def doc_to_visual(doc: dict) -> list:
    return [image for image, _ in _parts(doc)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """One IMAGE_MARK per image, each followed by its text (the demonstration's word; the query's question)."""
    return "".join(f"{IMAGE_MARK}{text}" for _, text in _parts(doc))


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    content = []
    for image, text in _parts(doc):
        content += [{"type": "image", "url": image}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def rows(split: str = "test", n: int = 20, seed: int = 0) -> list[dict]:
    """The task's rows for make_episodes(split, n, seed) (how test.jsonl is written)."""
    return [
        {"index": i, "split": split, "n": n, "seed": seed, "question": e.question, "answer": e.answer, "qtype": e.qtype}
        for i, e in enumerate(_episodes(split, n, seed))
    ]

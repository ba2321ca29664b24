"""Hooks of the vlm_prune_mosaic lmms-eval task: mosaics rebuilt from `vlm_prune.data.mosaic.make_mosaics` (the
samples `vlm-prune bench` uses), scored as `vlm_prune.demo.evaluate` scores them (first word, lower case)."""

from __future__ import annotations

import functools

from vlm_prune.data.mosaic import MosaicSample, make_mosaics
from vlm_prune.demo import normalize_answer


@functools.lru_cache(maxsize=8)
def _mosaics(split: str, n: int, seed: int) -> tuple:
    return tuple(make_mosaics(split, n, seed=seed))


def _sample(doc: dict) -> MosaicSample:
    sample = _mosaics(doc["split"], int(doc["n"]), int(doc["seed"]))[int(doc["index"])]
    if sample.question != doc["question"] or sample.answer != doc["answer"]:
        raise ValueError(f"row {doc['index']} does not match make_mosaics{(doc['split'], doc['n'], doc['seed'])}")
    return sample


def doc_to_visual(doc: dict) -> list:
    return [_sample(doc).image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def rows(split: str = "test", n: int = 40, seed: int = 0) -> list[dict]:
    """The task's rows for make_mosaics(split, n, seed) (how test.jsonl is written)."""
    return [
        {"index": i, "split": split, "n": n, "seed": seed, "question": s.question, "answer": s.answer, "qtype": s.qtype}
        for i, s in enumerate(make_mosaics(split, n, seed=seed))
    ]

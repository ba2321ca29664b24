"""Hooks of the vlm_prune_video lmms-eval task: clips rebuilt from `vlm_prune.tasks.video.make_clips`, scored
exactly as `vlm_prune.tasks.video.score` scores (first word, lower case)."""

from __future__ import annotations

import functools

from vlm_prune.demo import normalize_answer
from vlm_prune.pipelines import Frames
from vlm_prune.tasks import video as V

CLIP_FPS = 2.0  # the task's clips have no real frame rate; 2 frames per state = one state per second


@functools.lru_cache(maxsize=8)
def _clips(split: str, n: int, seed: int) -> tuple:
    return tuple(V.make_clips(split, n, seed=seed))


def _sample(doc: dict) -> V.VideoSample:
    sample = _clips(doc["split"], int(doc["n"]), int(doc["seed"]))[int(doc["index"])]
    if sample.question != doc["question"] or sample.answer != doc["answer"]:
        raise ValueError(f"row {doc['index']} does not match make_clips{(doc['split'], doc['n'], doc['seed'])}")
    return sample


def doc_to_visual(doc: dict) -> list:
    video = _sample(doc).video
    return [Frames(video, list(range(len(video))), fps=CLIP_FPS, total_frames=len(video))]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """The chat form of the same request (chat models): the clip as Frames in a video item, then the question.
    lmms-eval's automatic messages take only PIL images, paths and dicts as visuals."""
    (frames,) = doc_to_visual(doc)
    return [{"role": "user", "content": [{"type": "video", "url": frames}, {"type": "text", "text": doc["question"]}]}]


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def rows(split: str = "test", n: int = 20, seed: int = 0) -> list[dict]:
    """The task's rows for make_clips(split, n, seed) (how test.json is written)."""
    return [
        {"index": i, "split": split, "n": n, "seed": seed, "question": s.question, "answer": s.answer, "qtype": s.qtype}
        for i, s in enumerate(V.make_clips(split, n, seed=seed))
    ]

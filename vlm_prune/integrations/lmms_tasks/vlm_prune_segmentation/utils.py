"""Hooks of the vlm_prune_segmentation lmms-eval task: samples rebuilt from `vlm_prune.tasks.segmentation.
make_samples`, the model's mask read back with `vlm_prune.integrations.lmms_eval.text_to_mask` and scored with
the task's own `intersection_union` (gIoU: the mean per-sample IoU; cIoU: pooled, as `pooled_scores`)."""

from __future__ import annotations

import functools

from vlm_prune.integrations.lmms_eval import text_to_mask
from vlm_prune.tasks import segmentation as G


@functools.lru_cache(maxsize=8)
def _samples(split: str, n: int, seed: int) -> tuple:
    return tuple(G.make_samples(split, n, seed=seed))


def _sample(doc: dict) -> G.SegSample:
    sample = _samples(doc["split"], int(doc["n"]), int(doc["seed"]))[int(doc["index"])]
    if sample.prompt != doc["question"]:
        raise ValueError(f"row {doc['index']} does not match make_samples{(doc['split'], doc['n'], doc['seed'])}")
    return sample


def doc_to_visual(doc: dict) -> list:
    return [_sample(doc).image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    target = _sample(doc).mask
    predicted = text_to_mask(results[0])
    if predicted.shape != target.shape:  # no mask (or a broken one): nothing predicted
        predicted = target.new_zeros(target.shape)
    intersection, union = G.intersection_union(predicted, target)
    iou = 1.0 if union == 0 else intersection / union
    return {"giou": iou, "ciou": (intersection, union)}


def ciou(items: list) -> float:
    """Pooled intersection over pooled union of (intersection, union) pairs."""
    union = sum(u for _, u in items)
    return 1.0 if union == 0 else sum(i for i, _ in items) / union


def rows(split: str = "test", n: int = 20, seed: int = 0) -> list[dict]:
    """The task's rows for make_samples(split, n, seed) (how test.jsonl is written)."""
    return [
        {"index": i, "split": split, "n": n, "seed": seed, "question": s.prompt, "answer": s.answer, "qtype": s.qtype}
        for i, s in enumerate(_samples(split, n, seed))
    ]

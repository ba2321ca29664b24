"""The tasks `vlm-prune bench` runs: what a sample is, how it becomes model inputs, how answers are scored.

A `BenchTask` is data plus three functions, so `bench.run_bench` stays generic over tasks:

- `samples(n, seed)`: held-out test samples (objects with `.question`, `.answer`, `.qtype`);
- `prepare(model, processor, samples)`: the left-padded batch of model inputs for them;
- `answers(model, processor, samples, max_new_tokens)`: the greedy answers (strings).

Tasks: "mosaic" (images, `vlm_prune.data.mosaic`), "video" (`vlm_prune.tasks.video`), "icl" (few-shot
prompts, `vlm_prune.tasks.icl`) and "scene3d" (LLaVA-3D scenes, `vlm_prune.tasks.scene3d`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class BenchTask:
    """One bench task.

    media: "image" or "video": what an int budget counts ("tokens per image / per video").
    focus_qtypes: the question types behind `focus_accuracy` (the mosaic's cell questions; None = all).
    focus_name: how the report names them.
    default_model: the embedded model the task is meant for.
    default_keeps / quick_keeps: the budgets run by default (1.0 = the unpruned reference).
    own_budget: methods also run once with keep=None (their own data-dependent count, e.g. PruneVid).
    quick_samples: samples per run under `quick` (None: the bench's QUICK default), sized to stay < 3 minutes.
    score_samples: for a task scored otherwise than by exact-match answers (segmentation), (model, processor,
        samples) -> per sample {"score": in [0, 1], ...}; "accuracy" is then the mean score (segmentation: gIoU).
    pooled: (scored samples) -> metrics pooled over the set, reported with relative values (segmentation: cIoU).
    load_model: (spec, dtype, device) -> (model, processor, info) when the task needs more than a VLM.
    metric_name: what "accuracy" means for this task in reports.
    """

    name: str
    description: str
    media: str
    default_model: str
    samples: Callable[[int, int], list]
    prepare: Callable[[Any, Any, Sequence[Any]], Any]
    answers: Callable[[Any, Any, Sequence[Any], int], list[str]]
    default_keeps: tuple[float | int, ...]
    quick_keeps: tuple[float | int, ...]
    focus_qtypes: frozenset[str] | None = None
    focus_name: str = "all questions"
    default_methods: tuple[str, ...] | None = None
    own_budget: tuple[str, ...] = field(default_factory=tuple)
    quick_samples: int | None = None
    score_samples: Callable[[Any, Any, Sequence[Any]], list[dict]] | None = None
    pooled: Callable[[Sequence[dict]], dict[str, float]] | None = None
    load_model: Callable[..., tuple] | None = None
    metric_name: str = "accuracy"


# --------------------------------------------------------------------------------------------------- mosaic
def _mosaic_samples(n: int, seed: int) -> list:
    from vlm_prune.data.mosaic import make_mosaics

    return make_mosaics("test", n, seed=seed)


def _mosaic_prepare(model, processor, samples):
    from vlm_prune.demo import prepare_inputs

    return prepare_inputs(model, processor, [s.image for s in samples], [s.question for s in samples])


def _mosaic_answers(model, processor, samples, max_new_tokens: int) -> list[str]:
    from vlm_prune.demo import generate_answers

    return generate_answers(model, processor, [s.image for s in samples], [s.question for s in samples], max_new_tokens)


# ---------------------------------------------------------------------------------------------------- video
def _video_samples(n: int, seed: int, frames_per_step: int = 2) -> list:
    from vlm_prune.tasks.video import eval_samples

    return eval_samples(n, seed=seed, frames_per_step=frames_per_step)


def _video16_samples(n: int, seed: int) -> list:
    return _video_samples(n, seed, frames_per_step=4)


def _video_prepare(model, processor, samples):
    from vlm_prune.tasks.video import video_inputs

    parameter = next(model.parameters())
    return video_inputs(processor, samples, device=parameter.device, dtype=parameter.dtype)


def _video_answers(model, processor, samples, max_new_tokens: int) -> list[str]:
    from vlm_prune.tasks.video import generate_answers

    return generate_answers(model, processor, samples, batch_size=len(samples), max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------------- icl
def _icl_samples(n: int, seed: int) -> list:
    from vlm_prune.tasks.icl import DEMO_WORDS, make_episodes

    return make_episodes("test", n, seed=seed, shots=4, words=DEMO_WORDS)


def _icl_prepare(model, processor, samples):
    from vlm_prune.tasks.icl import episode_inputs

    parameter = next(model.parameters())
    return episode_inputs(processor, samples, device=parameter.device, dtype=parameter.dtype)


def _icl_answers(model, processor, samples, max_new_tokens: int) -> list[str]:
    from vlm_prune.tasks.icl import generate_answers

    return generate_answers(model, processor, samples, max_new_tokens)


# ------------------------------------------------------------------------------------------------ segmentation
def _segmentation_samples(n: int, seed: int) -> list:
    from vlm_prune.tasks.segmentation import make_samples

    return make_samples("test", n, seed=seed)


def _segmentation_prepare(model, processor, samples):
    from vlm_prune.tasks.segmentation import teacher_forced_inputs

    return teacher_forced_inputs(model, processor, samples)


def _segmentation_scores(model, processor, samples) -> list[dict]:
    from vlm_prune.tasks.segmentation import score_samples

    return score_samples(model, processor, samples)


def _segmentation_pooled(scored) -> dict[str, float]:
    from vlm_prune.tasks.segmentation import pooled_scores

    return pooled_scores(scored)


def _segmentation_load(spec: str, dtype=None, device: str = "cpu"):
    from vlm_prune.tasks.segmentation import load_bench_segmenter

    return load_bench_segmenter(spec, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------- scene3d
def _scene3d_samples(n: int, seed: int) -> list:
    from vlm_prune.tasks.scene3d import DEMO_IMAGE_SIZE, make_samples

    return make_samples("test", n, seed=1234 + seed, image_size=DEMO_IMAGE_SIZE)


def _scene3d_prepare(model, processor, samples):
    from vlm_prune.tasks.scene3d import scene_inputs

    parameter = next(model.parameters())
    return scene_inputs(processor, samples, parameter.device, parameter.dtype)


def _scene3d_answers(model, processor, samples, max_new_tokens: int) -> list[str]:
    from vlm_prune.tasks.scene3d import generate_answers

    return generate_answers(model, processor, samples, max_new_tokens)


def _scene3d_load(spec: str, dtype=None, device: str = "cpu"):
    from vlm_prune.tasks.scene3d import load_scene_model

    return load_scene_model(spec, dtype=dtype, device=device)


TASKS: dict[str, BenchTask] = {
    "mosaic": BenchTask(
        name="mosaic",
        description="3x3 mosaics of easy-VQA shapes (192x192 px, held-out test split); questions about one cell "
        "(color, shape, yes/no) or the whole image (count)",
        media="image",
        default_model="llava",
        samples=_mosaic_samples,
        prepare=_mosaic_prepare,
        answers=_mosaic_answers,
        default_keeps=(1.0, 192, 128, 64),
        quick_keeps=(1.0, 192, 64),
        focus_qtypes=frozenset({"color", "shape", "yesno"}),
        focus_name="cell questions",
    ),
    "video": BenchTask(
        name="video",
        description="8-frame clips of easy-VQA shapes that appear, move and change colour on a 2x2 board "
        "(held-out test split); questions that need time (what appeared last, what moved, start / end)",
        media="video",
        default_model="qwen2_vl_video",
        samples=_video_samples,
        prepare=_video_prepare,
        answers=_video_answers,
        default_keeps=(1.0, 0.5, 0.25, 0.1),
        quick_keeps=(1.0, 0.5, 0.25, 0.1),
        default_methods=("random", "pool", "divprune", "zoo", "fastv", "evs", "prunevid", "evs+divprune"),
        own_budget=("prunevid",),
        quick_samples=30,  # 6 per question type: 25 runs of the 8-layer video model in < 3 minutes
    ),
    "icl": BenchTask(
        name="icl",
        description="4-shot episodes of easy-VQA images (held-out test split) with nonce words bound to colours "
        "at random per episode; the query asks for the word of a new image (5 images per prompt)",
        media="image",
        default_model="llava_icl",  # the few-shot demo model (16 tokens per image); --model llava for 576
        samples=_icl_samples,
        prepare=_icl_prepare,
        answers=_icl_answers,
        default_keeps=(1.0, 0.333, 0.222, 0.111),  # R = 66.7 / 77.8 / 88.9 % removed
        quick_keeps=(1.0, 0.333, 0.222, 0.111),
        default_methods=("catp", "random", "pool", "divprune", "fastv", "zoo"),
    ),
    "segmentation": BenchTask(
        name="segmentation",
        description="2x2 mosaics of easy-VQA shapes (held-out test split) with referring and reasoning prompts "
        "('segment the shape that has the same color as the triangle'); gIoU and cIoU of the teacher-forced mask",
        media="image",
        default_model="llava_seg",  # vlm_prune/demo_models/llava_seg when shipped; or --model DIR
        samples=_segmentation_samples,
        prepare=_segmentation_prepare,
        answers=lambda model, processor, samples, max_new_tokens: [],
        default_keeps=(1.0, 0.5, 0.35, 0.25, 0.1),
        quick_keeps=(1.0, 0.35, 0.1),
        default_methods=("random", "pool", "divprune", "fastv", "zoo", "lvlm_csp"),
        quick_samples=16,
        score_samples=_segmentation_scores,
        pooled=_segmentation_pooled,
        load_model=_segmentation_load,
        metric_name="gIoU",
    ),
    "scene3d": BenchTask(
        name="scene3d",
        description="rooms of easy-VQA-textured boxes, spheres and cylinders seen from 4 posed RGB-D views (held-out "
        "test split, LLaVA-3D voxel tokens); questions that need 3-D: the nearest object, counts, left of seen "
        "from the door",
        media="scene",
        default_model="llava3d_scene",
        samples=_scene3d_samples,
        prepare=_scene3d_prepare,
        answers=_scene3d_answers,
        # 0.469 = AdaToken-3D's own schedule (15/32); 0.445 = the demo model's shipped calibrated AdaToken-3D preset
        # (its equivalent average, `adatoken3d_presets/calibrated.json`); 0.36 = the paper's -63 % prefill FLOPs on
        # the demo model (37 % of the unpruned FLOPs)
        default_keeps=(1.0, 0.469, 0.445, 0.36, 0.25, 0.125),
        quick_keeps=(1.0, 0.445, 0.36),
        default_methods=("adatoken3d", "random", "pool", "divprune", "fastv", "zoo"),
        own_budget=("adatoken3d",),
        quick_samples=30,
        load_model=_scene3d_load,
    ),
}


TASKS["video16"] = replace(
    TASKS["video"],
    name="video16",
    description="16-frame clips (each state held for 2 temporal steps: the temporal redundancy EVS is built for) "
    "of the video task",
    samples=_video16_samples,
    quick_samples=15,  # 3 per question type: 512 tokens a clip
)


def get_task(name: str) -> BenchTask:
    from vlm_prune.bench import BenchError

    if name not in TASKS:
        raise BenchError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return TASKS[name]

"""The embedded demo segmenter `llava_seg` (benchmarks/train_segmenter.py): it loads by name, segments held-out
mosaics (easy-VQA test images only) with the gIoU its report measured, reads the prompt (the same mosaic gets a
different mask for a different prompt), and LVLM_CSP runs on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlm_prune

pytest.importorskip("easy_vqa")
SHIPPED = Path(vlm_prune.__file__).resolve().parent / "demo_models" / "llava_seg"
pytestmark = pytest.mark.skipif(not (SHIPPED / "segmenter_config.json").is_file(), reason="llava_seg not built yet")

#: the shipped checkpoint's held-out gIoU: 0.845 on 400 mosaics (benchmarks/results/demo_segmenter.md), 0.901 on
#: these 32; the threshold is the issue's bar (0.75) plus a margin over it, and leaves room for float differences
#: between machines. Chance (a mask in a random cell) is ~0.25 x 0.85; a model that solves only position prompts
#: scores ~0.3, the previous model (no shape perception) 0.514 here
MEASURED_GIOU = 0.901
MIN_GIOU = 0.80
#: reasoning prompts alone (same_color, odd_one_out: they need each cell's SHAPE), 16 other test mosaics
MEASURED_REASONING_GIOU = 0.804
MIN_REASONING_GIOU = 0.65


@pytest.fixture(scope="module")
def seg():
    from vlm_prune.demo import load_processor
    from vlm_prune.models.segmenter import Segmenter

    segmenter = Segmenter.from_pretrained("llava_seg", dtype=torch.float32).eval()
    return segmenter, load_processor(SHIPPED / "vlm")


def _giou(segmenter, processor, samples) -> float:
    from vlm_prune.tasks.segmentation import score_samples

    scored = score_samples(segmenter.vlm, processor, samples)
    return sum(s["score"] for s in scored) / len(scored)


def test_held_out_giou_matches_the_report(seg):
    from vlm_prune.tasks.segmentation import make_samples

    segmenter, processor = seg
    with torch.no_grad():
        giou = _giou(segmenter, processor, make_samples("test", 32, seed=77))
    assert giou >= MIN_GIOU, giou


def test_reasoning_prompts_need_and_find_the_shape(seg):
    # "the only shape that is not a circle", "the same colour as the triangle": colour or position alone cannot
    # answer them (the previous model, with colour but no shape, scored 0.09 / 0.40 on these kinds)
    from vlm_prune.tasks.segmentation import make_samples

    segmenter, processor = seg
    samples = make_samples("test", 16, seed=78, kinds=("same_color", "odd_one_out"))
    with torch.no_grad():
        giou = _giou(segmenter, processor, samples)
    assert giou >= MIN_REASONING_GIOU, giou


def test_the_mask_follows_the_prompt_on_the_same_mosaic(seg):
    # one mosaic, four position prompts: each mask lies in its own cell (the LLM reads the prompt)
    from vlm_prune.tasks.segmentation import make_samples

    segmenter, processor = seg
    sample = make_samples("test", 1, seed=5, kinds=("referring_position",))[0]
    names = ("top left", "top right", "bottom left", "bottom right")
    hits = 0
    with torch.no_grad():
        for cell, name in enumerate(names):
            masks = segmenter.segment(sample.image, f"segment the shape in the {name}", processor=processor)["masks"]
            assert masks.shape == (1, 128, 128) and masks.dtype == torch.bool
            quadrants = masks[0].reshape(2, 64, 2, 64).sum((1, 3)).flatten()
            hits += int(quadrants.argmax()) == cell
    assert hits >= 3


def test_lvlm_csp_runs_on_the_shipped_model_and_reports_its_flops(seg):
    from vlm_prune.tasks.segmentation import make_samples

    segmenter, processor = seg
    sample = make_samples("test", 1, seed=6)[0]
    segmenter.apply_pruning("lvlm_csp", keep=0.1, s1=1, s2=3)
    try:
        with torch.no_grad():
            out = segmenter.segment(sample.image, sample.prompt, processor=processor)
        assert out["masks"].shape == (1, 128, 128)
        assert out["stats"].image_token_flops_reduction > 0.6
    finally:
        segmenter.remove_pruning()

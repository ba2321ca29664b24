"""The embedded LLaVA-3D demo model `llava3d_scene`: small fp16 checkpoint, >= 8 decoder layers, and its held-out
accuracy per question type on a fixed sample, pinned just below the value measured when it shipped
(`benchmarks/results/demo_scene3d_train.json`; the margin allows one flipped answer per type)."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_prune.tasks import scene3d as S

FOLDER = S.demo_scene_folder()
pytestmark = pytest.mark.skipif(not (FOLDER / "config.json").is_file(), reason="llava3d_scene is not built")

#: measured on `eval_samples(24, seed=1234)` (8 per type) with the shipped checkpoint, minus one answer per type
#: (phase 5, shipped: 5/8, 7/8, 8/8 here and 0.89 / 0.92 / 1.00 on the 300 held-out rooms; phase 4: 5/8, 8/8, 8/8)
MIN_ACCURACY = {"nearest": 0.5, "count": 0.75, "left": 0.875}


def test_checkpoint_is_small_fp16_with_enough_depth():
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["dtype"] == "float16" and config["text_config"]["num_hidden_layers"] >= 8
    size = sum(f.stat().st_size for f in FOLDER.glob("*.safetensors"))
    assert size < 8 * 2**20


def test_held_out_accuracy_per_question_type():
    from vlm_prune.demo import normalize_answer

    model, processor, info = S.load_scene_model()
    assert info["source"] == "embedded" and next(model.parameters()).dtype == torch.float32
    samples = S.eval_samples(24, seed=1234, image_size=S.DEMO_IMAGE_SIZE)
    preds = []
    for i in range(0, len(samples), 8):
        preds += [normalize_answer(t) for t in S.generate_answers(model, processor, samples[i : i + 8])]
    acc = S.score(samples, preds)
    for qtype, floor in MIN_ACCURACY.items():
        assert acc[qtype] >= floor, (qtype, acc)

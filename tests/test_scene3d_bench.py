"""`vlm-prune bench --task scene3d` end to end on a tiny random LLaVA-3D: processor inputs, AdaToken-3D's stages,
the baselines, per-question-type accuracy (random weights: only the plumbing is asserted)."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.tasks import scene3d as S


@pytest.fixture(scope="module")
def tiny():
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration
    from vlm_prune.models.llava3d.processing import Llava3DProcessor
    from vlm_prune.models.llava3d.tiny import tiny_llava3d_config

    tokenizer = S.build_tokenizer()
    config = tiny_llava3d_config(4, image_size=96, patch_size=12, vocab_size=len(tokenizer))
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config.click_token_id = tokenizer.convert_tokens_to_ids("<boxes>")
    torch.manual_seed(0)
    model = Llava3DForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights: never emit the placeholders or <pad> / <s>
        model.lm_head.weight[list(range(len(S.TOKENIZER_SPECIALS)))] = 0.0
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model, Llava3DProcessor.for_model(model.config, tokenizer)


def test_scene_inputs_hold_one_placeholder_per_voxel(tiny):
    model, processor = tiny
    samples = S.make_samples("test", 2, seed=9, image_size=96)
    inputs = S.scene_inputs(processor, samples)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    with torch.no_grad():
        enc = model.get_image_features(
            inputs["pixel_values"], inputs["depths"], inputs["intrinsics"], inputs["poses"], inputs["axis_align"]
        )
    assert counts.tolist() == [len(x) for x in enc.pooler_output]
    # the voxels lie in the aligned room frame: inside the room, on or above the floor
    for xyz in enc.voxel_xyz:
        assert xyz[:, :2].abs().max() <= S.ROOM.half + 0.1 and xyz[:, 2].min() >= -0.1
    assert len(S.generate_answers(model, processor, samples, 2)) == 2
    with pytest.raises(S.DataError):
        S.scene_inputs(processor, S.make_samples("test", 1, seed=9, render=False))


def test_bench_task_runs_adatoken3d_and_baselines(tiny):
    from vlm_prune.bench import run_bench

    model, processor = tiny
    samples = S.make_samples("test", 3, seed=1234, image_size=96)
    result = run_bench(
        "tiny_llava3d", task="scene3d", methods=["adatoken3d", "random"], keeps=[1.0, 0.5], n_samples=3, repeats=1,
        warmup=0, model=model, processor=processor, samples=samples, progress=False, decode_tokens=1, max_new_tokens=2,
    )  # fmt: skip
    rows = {(r["method"], r["keep"]): r for r in result["results"]}
    assert ("unpruned", 1.0) in rows and ("adatoken3d", None) in rows and ("random", 0.5) in rows
    own = rows[("adatoken3d", None)]
    assert [s["layer"] for s in own["stages"]] == [1, 2, 3]  # L/4, L/2, 3L/4 of 4 layers
    assert own["flops_ratio"] < 1.0 and set(own["per_qtype"]) == set(S.QTYPES)
    assert result["task"]["name"] == "scene3d" and not [s for s in result["skipped"] if s["status"] == "failed"]

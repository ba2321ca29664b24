"""The embedded demo models: offline loading, clear errors, and unpruned accuracy above a floor."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("easy_vqa")

from vlm_prune import demo  # noqa: E402
from vlm_prune.data import CELL_QTYPES, make_mosaics  # noqa: E402
from vlm_prune.errors import PruneError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.demo_depth import expand_state_dict, expansion_plan, mapped_layer  # noqa: E402

MIN_DECODER_LAYERS = 12
MIN_CELL_ACCURACY = 0.875  # unpruned, on the fixed 40-question test sample; see benchmarks/results/demo_models.md
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def cell_sample():
    return make_mosaics("test", 40, seed=0, qtypes=CELL_QTYPES)


def _built(name: str) -> bool:
    return (demo.demo_model_path(name) / "model.safetensors").is_file()


# A checkpoint missing from a source tree (e.g. while it is being retrained) skips its tests.
requires_built = {name: pytest.mark.skipif(not _built(name), reason=f"{name} checkpoint not built yet") for name in
                  demo.DEMO_MODELS}  # fmt: skip


@pytest.fixture(scope="module", params=[pytest.param(n, marks=requires_built[n]) for n in demo.DEMO_MODELS])
def loaded(request):
    torch.manual_seed(0)
    model, processor = demo.demo_model(request.param)
    return request.param, model, processor


def test_the_default_demo_model_is_shipped():
    assert _built("llava"), "the main job needs the embedded LLaVA under vlm_prune/demo_models/llava"


def test_checkpoints_are_small_fp16():
    for name in filter(_built, demo.DEMO_MODELS):
        path = demo.demo_model_path(name)
        weights = path / "model.safetensors"
        assert weights.stat().st_size < 8 * 2**20
        cfg = json.loads((path / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"


def test_auto_classes_load_llava_offline():
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    path = demo.demo_model_path("llava")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    assert isinstance(model, LlavaForConditionalGeneration)
    image = make_mosaics("test", 1, seed=0)[0].image
    enc = processor(text=[demo.build_prompt(processor, "what shape is in the middle?")], images=[image],
                    return_tensors="pt")  # fmt: skip
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576
    assert tuple(enc["pixel_values"].shape) == (1, 3, 192, 192)


@requires_built["qwen2_vl"]
def test_auto_classes_load_qwen2_vl_offline():
    from transformers import AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

    path = demo.demo_model_path("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    if HAS_TORCHVISION:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    else:  # transformers builds Qwen2VLProcessor only with torchvision; demo falls back to an image-only one
        processor = demo.load_processor(path)
    image = make_mosaics("test", 1, seed=0)[0].image
    enc = processor(text=[demo.build_prompt(processor, "what shape is in the middle?")], images=[image],
                    return_tensors="pt")  # fmt: skip
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 576
    assert enc["image_grid_thw"].tolist() == [[1, 48, 48]]


def test_unpruned_accuracy_on_fixed_sample(loaded, cell_sample):
    name, model, processor = loaded
    res = demo.evaluate(model, processor, cell_sample, batch_size=20, progress=False)
    assert res["n"] == 40 and len(res["predictions"]) == 40
    assert set(res["per_qtype"]) == set(CELL_QTYPES)
    assert res["cell_accuracy"] == res["accuracy"]
    assert res["accuracy"] >= MIN_CELL_ACCURACY, (name, res["per_qtype"])


def test_prompt_and_answers(loaded):
    name, model, processor = loaded
    prompt = demo.build_prompt(processor, "is there a red shape in the middle?")
    assert processor.image_token in prompt and "is there a red shape in the middle?" in prompt
    s = make_mosaics("test", 2, seed=5)
    answers = demo.generate_answers(model, processor, [x.image for x in s], [x.question for x in s])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_transformers_pipeline_is_a_drop_in(loaded):
    """`pipeline("image-text-to-text")` on a wrapped model prunes and answers as generate() on the same inputs."""
    from transformers import pipeline

    import vlm_prune

    name, model, processor = loaded
    samples = make_mosaics("test", 3, seed=11, qtypes=CELL_QTYPES)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with vlm_prune.pruned(model, "divprune", keep=64) as handle:
        direct = demo.generate_answers(model, processor, [x.image for x in samples], [x.question for x in samples])
        for sample, expected in zip(samples, direct):
            messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                     {"type": "text", "text": sample.question}]}]  # fmt: skip
            out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
            assert handle.stats.visual_tokens_in == 576 and handle.stats.visual_tokens_out == 64
            assert out[0]["generated_text"].split()[:1] == expected.split()[:1], (name, sample.question)


def test_unknown_name_and_bad_paths(tmp_path):
    with pytest.raises(demo.UnknownDemoModelError, match="llava, qwen2_vl") as e:
        demo.demo_model("gpt-7")
    assert isinstance(e.value, PruneError)
    with pytest.raises(demo.DemoModelError, match="does not exist"):
        demo.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(demo.DemoModelError, match="not a saved model"):
        demo.load_model(tmp_path / "empty")
    assert demo.demo_model_path("Qwen2-VL").name == "qwen2_vl"


def test_expansion_plan_spreads_new_layers_before_the_originals():
    plan = expansion_plan(4, 12)
    assert [pos for pos, (_, is_orig) in enumerate(plan) if is_orig] == [0, 4, 8, 11]
    assert [src for src, _ in plan] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [mapped_layer(expansion_plan(4, 16), i) for i in range(4)] == [0, 5, 10, 15]
    assert expansion_plan(4, 4) == [(0, True), (1, True), (2, True), (3, True)]
    with pytest.raises(ValueError):
        expansion_plan(4, 3)


def test_expanded_decoder_starts_as_the_original(loaded):
    """A decoder expanded by benchmarks/demo_depth.py gives exactly the original logits before training: every
    new layer copies the next original one with zeroed output projections, so it adds nothing to the residual."""
    name, model, processor = loaded
    text = model.config.text_config
    depth = text.num_hidden_layers
    plan = expansion_plan(depth, depth + 2 * (depth - 1))
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = len(plan)
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = [text.layer_types[0]] * len(plan)
    deeper = type(model)(config).eval()
    state = expand_state_dict(model.state_dict(), plan)
    deeper.load_state_dict(state, strict=True)
    new = next(pos for pos, (_, is_orig) in enumerate(plan) if not is_orig)
    layer = deeper.model.language_model.layers[new]
    assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    follower = model.model.language_model.layers[plan[new][0]]
    assert torch.equal(layer.self_attn.q_proj.weight, follower.self_attn.q_proj.weight)
    sample = make_mosaics("test", 1, seed=3)[0]
    enc = processor(text=[demo.build_prompt(processor, sample.question)], images=[sample.image], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        got = deeper(**enc).logits
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_demo_models_are_deep_enough_for_in_llm_methods():
    """Issue 16: multi-stage in-LLM schedules need at least 12 decoder layers."""
    for name in filter(_built, demo.DEMO_MODELS):
        cfg = json.loads((demo.demo_model_path(name) / "config.json").read_text())
        assert cfg["text_config"]["num_hidden_layers"] >= MIN_DECODER_LAYERS, name


@pytest.mark.parametrize("name", [pytest.param(n, marks=requires_built[n]) for n in demo.DEMO_MODELS])
def test_calibrated_adaptinfer_presets_ship_and_resolve(name, tmp_path):
    """Each embedded model ships `vlm-prune calibrate` presets for 192 / 128 / 64 equivalent average tokens, and
    AdaptInfer bound to that model picks them for those budgets (as an int count or the matching fraction)."""
    from types import SimpleNamespace

    from vlm_prune.methods.adaptinfer import AdaptInfer
    from vlm_prune.methods.calibration import DEMO_PRESET_FOLDER, demo_preset

    path = demo.demo_model_path(name)
    depth = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    info = SimpleNamespace(name_or_path=str(path), num_layers=depth, family=name)
    for tokens in (192, 128, 64):
        preset = path / DEMO_PRESET_FOLDER / f"adaptinfer_{tokens}.json"
        data = json.loads(preset.read_text())
        assert data["num_layers"] == depth and data["layers"][0] >= 1
        # equivalent average tokens by hand: every layer before the first stage sees all 576 tokens
        bounds = [*data["layers"], depth]
        per_layer = [1.0] * data["layers"][0]
        for i, keep in enumerate(data["stage_keep"]):
            per_layer += [keep] * (bounds[i + 1] - bounds[i])
        assert len(per_layer) == depth
        assert abs(sum(per_layer) / depth * 576 - tokens) < 1.0, (name, tokens, data)
        assert demo_preset(info, tokens) == preset and demo_preset(info, tokens / 576) == preset
        schedule = AdaptInfer(keep=tokens).bind(info).resolve_schedule()
        assert list(schedule.layers) == data["layers"]
        assert list(schedule.keep) == pytest.approx(data["stage_keep"])
    assert demo_preset(info, 100) is None
    assert demo_preset(SimpleNamespace(name_or_path=str(path), num_layers=depth + 1), 192) is None  # stale depth
    assert demo_preset(SimpleNamespace(name_or_path=str(tmp_path), num_layers=depth), 192) is None  # not embedded

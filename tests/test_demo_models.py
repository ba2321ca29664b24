"""The embedded demo models: offline loading, clear errors, and unpruned accuracy above a floor."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("easy_vqa")

from vlm_prune import demo  # noqa: E402
from vlm_prune.data import CELL_QTYPES, make_mosaics  # noqa: E402
from vlm_prune.errors import PruneError  # noqa: E402

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

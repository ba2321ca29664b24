"""vLLM plugin, tier 2: the processor alone emits `count(grid, spec)` placeholders; the cache keys on the spec.

`MULTIMODAL_REGISTRY.create_processor(ModelConfig(...))` on the tiny offline checkpoint (vlm_prune.integrations.vllm.
testing), with and without the opt-in. Runs in .venv-vllm (scripts/vllm_env.sh).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in .venv-vllm (bash scripts/vllm_env.sh)")

from PIL import Image  # noqa: E402

from vlm_prune.integrations.vllm import register  # noqa: E402
from vlm_prune.integrations.vllm import testing as T  # noqa: E402
from vlm_prune.integrations.vllm.spec import count, parse_spec  # noqa: E402

ARCHS = {"qwen2_5_vl": "VlmPruneQwen2_5_VLForConditionalGeneration",
         "qwen2_vl": "VlmPruneQwen2VLForConditionalGeneration",
         "qwen3_vl": "VlmPruneQwen3VLForConditionalGeneration"}
PROMPT = "<|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|video_pad|><|vision_end|>what"


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, family: str) -> str:
    return str(T.build_checkpoint(tmp_path_factory.mktemp(f"tiny_{family}"), family=family))


def _processor(folder: str, spec: dict | None, arch: str):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    register()
    overrides = {} if spec is None else {"architectures": [arch], "vlm_prune": spec}
    config = ModelConfig(model=folder, hf_overrides=overrides, dtype="float32", max_model_len=2048,
                         limit_mm_per_prompt={"image": 2, "video": 1})
    return MULTIMODAL_REGISTRY.create_processor(config)


def _apply(processor, images, frames):
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    ids = processor.info.get_tokenizer().encode(PROMPT)
    data = processor.info.parse_mm_data({"image": images, "video": [T.video_input(frames)]})
    return processor.apply(ProcessorInputs(prompt=ids, mm_data_items=data), TimingContext())


def _media(seed: int):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8))]
    frames = (rng.random((4, 32, 40, 3)) * 255).astype(np.uint8)
    return images, frames


def test_placeholder_counts_follow_count_for_each_method_and_budget(folder: str, family: str) -> None:
    """Qwen3-VL: the video placeholder also holds each frame's timestamp text and markers, as unpruned."""
    arch = ARCHS[family]
    images, frames = _media(0)
    base = _processor(folder, None, arch)
    unpruned = _apply(base, images, frames)
    image_grid = unpruned["mm_kwargs"]["image"][0]["image_grid_thw"].data.tolist()
    video_grid = unpruned["mm_kwargs"]["video"][0]["video_grid_thw"].data.tolist()
    ids = unpruned["prompt_token_ids"]
    assert ids.count(T.IMAGE_PAD) == 1 * 4 * 6 and ids.count(T.VIDEO_PAD) == 2 * 4 * 5  # not opted in: vLLM's own
    span = unpruned["mm_placeholders"]["video"][0]
    video_text = span.length - 2 * 4 * 5  # 0, or Qwen3-VL's frames' timestamps and vision start / end tokens
    assert video_text == sum(t != T.VIDEO_PAD for t in ids[span.offset : span.offset + span.length])
    assert video_text > 2 * 2 if family == "qwen3_vl" else video_text == 0
    hashes = {str(unpruned["mm_hashes"])}
    for raw in ({"method": "divprune", "keep": 0.25}, {"method": "pool", "keep": 5},
                {"method": "evs", "keep": 0.5}, {"method": "zoo", "keep": 3, "modalities": ["image"]}):
        spec = parse_spec(raw)
        out = _apply(_processor(folder, raw, arch), images, frames)
        ids = out["prompt_token_ids"]
        assert ids.count(T.IMAGE_PAD) == count(image_grid, spec, "image"), raw
        assert ids.count(T.VIDEO_PAD) == count(video_grid, spec, "video"), raw
        placeholders = out["mm_placeholders"]
        assert placeholders["image"][0].length == count(image_grid, spec, "image")
        assert placeholders["video"][0].length == count(video_grid, spec, "video") + video_text
        # every pruning setting gets its own cache identity for the same media (processor and encoder caches)
        hashes.add(str(out["mm_hashes"]))
    assert len(hashes) == 5
    # the same setting hashes the same media the same way (the cache still hits)
    again = _apply(_processor(folder, {"method": "divprune", "keep": 0.25}, arch), images, frames)
    assert str(again["mm_hashes"]) in hashes

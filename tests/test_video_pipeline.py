"""transformers pipelines answer video chat messages on a vlm_prune-wrapped model exactly as generate() does.

`pipeline("image-text-to-text")` and `pipeline("any-to-any")` build video inputs with the processor's own video
processor, which needs torchvision: this file runs in .venv-clip (scripts/open_clip_env.sh: torch 2.14.1 +
torchvision 0.29.1), where it loads; scripts/test.sh runs it there. Without torchvision it skips with that reason.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "torchvision", reason="the processor's video processor needs torchvision: run `bash scripts/open_clip_env.sh`, "
    "then `.venv-clip/bin/python -m pytest tests/test_video_pipeline.py`",
)  # fmt: skip
pytest.importorskip("easy_vqa")

import vlm_prune  # noqa: E402
from vlm_prune.methods.evs import retained_count  # noqa: E402
from vlm_prune.tasks import video as V  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def video_model():
    model, processor = vlm_prune.demo_model("qwen2_vl_video")
    assert processor.video_processor is not None
    return model, processor


def _messages(sample) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": sample.video},
                                         {"type": "text", "text": sample.question}]}]  # fmt: skip


@pytest.mark.parametrize("task", ["image-text-to-text", "any-to-any"])
def test_pipeline_answers_video_chats_as_generate_does(video_model, task):
    from transformers import pipeline

    model, processor = video_model
    samples = V.make_clips("test", 3, seed=0)
    pipe = pipeline(task, model=model, processor=processor)
    grid = (4, 16, 16)  # 8 frames of 64 x 64, patch 4, temporal patch 2
    with vlm_prune.pruned(model, "evs", keep=0.5) as handle:
        bench = V.generate_answers(model, processor, samples, batch_size=1)  # the bench's (torchvision-free) path
        for sample, expected in zip(samples, bench):
            inputs = processor.apply_chat_template(_messages(sample), tokenize=True, return_dict=True,
                                                   add_generation_prompt=True, return_tensors="pt")  # fmt: skip
            want = V.video_inputs(processor, [sample])  # the processor's video processor = the numpy route
            assert inputs["input_ids"].tolist() == want["input_ids"].tolist()
            torch.testing.assert_close(inputs["pixel_values_videos"], want["pixel_values_videos"], atol=1e-5, rtol=0)
            assert inputs["video_grid_thw"].tolist() == [list(grid)]
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            direct = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            assert handle.stats.visual_tokens_in == 256
            assert handle.stats.visual_tokens_out == retained_count(grid, 0.5, spatial_merge_size=2)
            before = handle.stats
            got = pipe(text=_messages(sample), max_new_tokens=4, return_full_text=False,
                       generate_kwargs={"do_sample": False})  # fmt: skip
            assert handle.stats is not before  # the pipeline's prefill went through the handle (new stats)
            assert handle.stats.visual_tokens_out == retained_count(grid, 0.5, spatial_merge_size=2)
            assert got[0]["generated_text"].strip() == direct.strip()  # the pipeline keeps the space token's text
            ids = pipe(text=_messages(sample), max_new_tokens=4, return_tensors=True,
                       generate_kwargs={"do_sample": False})[0]["generated_token_ids"]  # fmt: skip
            assert list(ids) == out[0].tolist()  # token for token what generate() gives
            assert direct.strip() == expected
    assert sum(a == s.answer for a, s in zip(bench, samples)) >= 2  # the model answers these clips

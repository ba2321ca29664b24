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


def _toy_llava_processor(family: str, model):
    """transformers' own LLaVA-OneVision / LLaVA-NeXT-Video processor around a word tokenizer of the toy ids."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vlm_prune.toy_models import TINY_VOCAB

    specials = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<vs>", "<ve>"]
    vocab = {w: i for i, w in enumerate(specials + ["USER", ":", "ASSISTANT", "what", "moved", "?"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), TINY_VOCAB)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
    template = ("{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'video' %}<video>"
                "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT :")
    cfg, side = model.config, model.config.vision_config.image_size
    if family == "llava_onevision":
        return T.LlavaOnevisionProcessor(
            image_processor=T.LlavaOnevisionImageProcessor(size={"height": side, "width": side}), tokenizer=tok,
            video_processor=T.LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
            chat_template=template, num_image_tokens=(side // cfg.vision_config.patch_size) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio=cfg.vision_aspect_ratio,
        )  # fmt: skip
    square = {"height": side, "width": side}
    return T.LlavaNextVideoProcessor(
        image_processor=T.LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size=square), tokenizer=tok,
        video_processor=T.LlavaNextVideoVideoProcessor(size={"shortest_edge": side}, crop_size=square),
        chat_template=template, patch_size=cfg.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_llava_video_numpy_route_equals_the_families_own_processors(family):
    """VideoQA's torchvision-free LLaVA video inputs against transformers' processors: the same token ids (so the
    same placeholder counts) and the same pixels (exact at the tower's size; within bicubic differences when
    resized), and VideoQA through the processor route answers as through the numpy route."""
    import numpy as np

    from vlm_prune.pipelines import Frames, VideoQA
    from vlm_prune.toy_models import build_tiny
    from vlm_prune.video import llava_inputs as L

    model = build_tiny(family)
    proc = _toy_llava_processor(family, model)
    s = L.settings_for(model, proc)
    side = s.size
    rng = np.random.default_rng(0)
    for shape, max_diff, mean_diff in (((4, side, side, 3), 1e-5, 1e-6), ((4, 50, 70, 3), 0.2, 0.01),
                                       ((3, 70, 50, 3), 0.2, 0.01)):  # fmt: skip
        frames = rng.integers(0, 255, shape, dtype=np.uint8)  # noise, the harshest case: 0.01 ~ 0.7 grey levels
        want = L.processor_inputs(proc, frames, "what moved ?", s)
        got = L.numpy_inputs(model, proc, frames, "what moved ?", s)
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        diff = (got["pixel_values_videos"] - want["pixel_values_videos"]).abs()
        assert got["pixel_values_videos"].shape == want["pixel_values_videos"].shape
        assert float(diff.max()) < max_diff and float(diff.mean()) < mean_diff, (shape, diff.max(), diff.mean())
    frames = rng.integers(0, 255, (6, side, side, 3), dtype=np.uint8)

    class NoVideoProcessor:  # the same processor seen without torchvision: the numpy route
        tokenizer, chat_template, video_processor = proc.tokenizer, proc.chat_template, None
        image_processor = proc.image_processor
        apply_chat_template = staticmethod(proc.apply_chat_template)

    answers = [VideoQA(model, p, method="evs", keep=0.5, num_frames=4, max_new_tokens=3).answer(
        Frames(frames, [0, 2, 4, 9, 11, 30]), "what moved ?") for p in (proc, NoVideoProcessor())]  # fmt: skip
    assert answers[0].text == answers[1].text and answers[0].frames == answers[1].frames
    assert answers[0].stats.tokens_kept == answers[1].stats.tokens_kept == answers[0].stats.tokens_requested

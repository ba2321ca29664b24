"""VideoQA: decoding (decord and PyAV agree; container counts), the CLIP scorer against the model's own logits,
Qwen video inputs with true frame times, and the pipeline end to end on the embedded Qwen2-VL and tiny
Qwen2.5-VL / Qwen3-VL models, with requested vs kept tokens and the memory cap."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("decord")
pytest.importorskip("av")
iscc_samples = pytest.importorskip("iscc_samples")

from vlm_prune import demo  # noqa: E402
from vlm_prune.methods.evs import retained_count  # noqa: E402
from vlm_prune.pipelines import Frames, VideoMemoryError, VideoQA  # noqa: E402
from vlm_prune.video import decode as D  # noqa: E402
from vlm_prune.video import qwen_inputs as Q  # noqa: E402
from vlm_prune.video import samplers as S  # noqa: E402
from vlm_prune.video.scorers import TransformersClipScorer  # noqa: E402

torch.set_num_threads(1)
VIDEOS = {p.name: str(p) for p in iscc_samples.videos()}
MP4 = VIDEOS["demo.mp4"]
# demo.mp4 frames (144x176) -> 64x72 px (smart_resize), 16x18 patches of 4 px
SMALL = dict(min_pixels=32 * 32, max_pixels=64 * 80)


# ------------------------------------------------------------------------------------------------ decoding


def test_probe_reads_fps_and_frame_count_from_the_container():
    for backend in ("decord", "pyav"):
        info = D.probe(MP4, backend=backend)
        assert (info.num_frames, info.fps, info.height, info.width) == (1441, 24.0, 144, 176)
        assert info.backend == backend


@pytest.mark.parametrize("name", ["demo.webm", "demo.mkv"])
def test_pyav_zero_frame_headers_are_counted(name):
    import av

    with av.open(VIDEOS[name]) as c:
        assert c.streams.video[0].frames == 0  # the case being handled: the header says 0
    assert D.probe(VIDEOS[name], backend="pyav").num_frames == 1441 == D.probe(VIDEOS[name], "decord").num_frames


def test_decord_and_pyav_give_identical_frames():
    idx = S.uniform_indices(1441, 16)
    a, info = D.read_frames(MP4, idx, backend="decord")
    b, _ = D.read_frames(MP4, idx, backend="pyav")
    assert a.shape == (16, 144, 176, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # any order, repeats allowed
    c, _ = D.read_frames(MP4, [idx[3], idx[0], idx[3]], backend="pyav")
    np.testing.assert_array_equal(c, a[[3, 0, 3]])


def test_pyav_seek_equals_decoding_everything():
    idx = [10, 300, 301, 900, 1440]
    seek, _ = D.read_frames(VIDEOS["demo.webm"], idx, backend="pyav")
    full = D._pyav_sequential(VIDEOS["demo.webm"], idx)
    np.testing.assert_array_equal(seek, np.stack([full[i] for i in idx]))


def test_decode_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(D.VideoDecodeError, match="outside the video"):
        D.read_frames(MP4, [1441])
    with pytest.raises(D.VideoDecodeError, match="does not exist"):
        D.probe(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(D.VideoDecodeError, match="could not read"):
        D.probe(bad)


# ------------------------------------------------------------------------------------------------ CLIP scorer


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "dog", "cat", "red", "where", "is", "the", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def _tiny(kind: str):
    import transformers as T

    text = dict(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    if kind == "clip":
        cfg = T.CLIPConfig(text_config={**text, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1},
                           vision_config=vision, projection_dim=16)  # fmt: skip
        ip = T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return T.CLIPModel(cfg).eval(), T.CLIPProcessor(image_processor=ip, tokenizer=_word_tokenizer())
    cfg = T.SiglipConfig(text_config=text, vision_config=vision)
    ip = T.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return T.SiglipModel(cfg).eval(), T.SiglipProcessor(image_processor=ip, tokenizer=_word_tokenizer())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_scorer_is_the_models_cosine_in_any_batch_size(kind):
    from PIL import Image

    model, proc = _tiny(kind)
    frames = np.random.default_rng(0).integers(0, 255, (7, 40, 50, 3), dtype=np.uint8)
    text = "where is the dog ?"
    got = TransformersClipScorer(model, proc, batch_size=3).score(frames, text)
    assert got.shape == (7,) and got.dtype == torch.float32
    # reference: the model's own forward, whose logits are scale * cosine (+ bias for SigLIP)
    pad = {"padding": "max_length", "max_length": 16} if kind == "siglip" else {"padding": True}
    batch = proc(text=[text], images=[Image.fromarray(f) for f in frames], return_tensors="pt", **pad)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")})
    logits = out.logits_per_image[:, 0]
    if kind == "siglip":
        logits = logits - model.logit_bias.squeeze()
    torch.testing.assert_close(got, logits / model.logit_scale.exp(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(TransformersClipScorer(model, proc, batch_size=32).score(frames, text), got)


# ------------------------------------------------------------------------------------------------ Qwen inputs


@pytest.fixture(scope="module")
def demo_qwen():
    return demo.demo_model("qwen2_vl")


def _tiny_qwen(family: str, tokenizer):
    """A random tiny Qwen2.5-VL / Qwen3-VL whose media ids are the demo tokenizer's (patch 4, merge 2, tps 2)."""
    from vlm_prune.toy_models import _classes, build_config

    config = build_config(family)
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", Q.VISION_START, Q.VISION_END])
    config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id = ids
    torch.manual_seed(0)
    model = _classes(family)[1](config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_qwen3_timestamps_are_the_original_frames_times():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    times = Q.FrameTimes((0, 24, 48, 96, 100), fps=24.0, total_frames=1441)
    # steps (0, 24) -> 0.5 s, (48, 96) -> 3.0 s, (100, 100 repeated) -> 4.1667 s
    np.testing.assert_allclose(Q.step_timestamps(times, 2), [0.5, 3.0, 100 / 24])
    np.testing.assert_allclose(
        Q.step_timestamps(times, 2), Qwen3VLProcessor._calculate_timestamps(None, list(times.indices), 24.0, 2)
    )
    text = Q.placeholder("qwen3_vl", (3, 4, 4), 2, Q.step_timestamps(times, 2))
    pads = Q.VIDEO_PAD * 4
    assert text == "".join(f"<{t} seconds>{Q.VISION_START}{pads}{Q.VISION_END}" for t in ("0.5", "3.0", "4.2"))
    assert Q.placeholder("qwen2_5_vl", (3, 4, 4), 2, []) == Q.VIDEO_PAD * 12
    meta = times.metadata(144, 176)
    assert meta.frames_indices == [0, 24, 48, 96, 100] and meta.fps == 24.0 and meta.total_num_frames == 1441


def test_qwen2_5_second_per_grid_and_the_nonuniform_warning():
    uniform = Q.FrameTimes(tuple(S.uniform_indices(1441, 16)), 24.0, 1441)
    assert Q.second_per_grid_ts(uniform, 2) == pytest.approx(2 * 1441 / (16 * 24))  # tps / (k / N * fps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Q.warn_if_nonuniform("qwen2_5_vl", uniform)
    skewed = Q.FrameTimes((0, 10, 20, 700), 24.0, 1441)
    with pytest.warns(Q.NonUniformFramesWarning, match="sampler='uniform'"):
        assert Q.warn_if_nonuniform("qwen2_5_vl", skewed, "sampler 'bolt'")
    with warnings.catch_warnings():  # Qwen3-VL's stamps are exact, Qwen2-VL has no seconds: no warning
        warnings.simplefilter("error")
        assert not Q.warn_if_nonuniform("qwen3_vl", skewed) and not Q.warn_if_nonuniform("qwen2_vl", skewed)


def test_numpy_inputs_match_a_hand_built_prompt(demo_qwen):
    from vlm_prune.tasks.video_processing import preprocess_video

    model, proc = demo_qwen
    frames, _ = D.read_frames(MP4, [0, 100, 200, 300])
    qa = VideoQA(model, proc, method="none", **SMALL)
    times = Q.FrameTimes((0, 100, 200, 300), 24.0, 1441)
    got = Q.numpy_inputs(model, proc, frames, times, "what is it?", qa.settings)
    rows, grid = preprocess_video(frames, qa.settings)
    assert grid == (2, 16, 18) and tuple(got["video_grid_thw"][0].tolist()) == grid
    np.testing.assert_array_equal(got["pixel_values_videos"].numpy(), rows)
    tok = proc.tokenizer
    want = tok(Q.video_prompt(proc, "what is it?").replace(Q.VIDEO_PAD, Q.VIDEO_PAD * 144),
               add_special_tokens=False)["input_ids"]  # fmt: skip
    assert got["input_ids"][0].tolist() == want
    video_id = tok.convert_tokens_to_ids(Q.VIDEO_PAD)
    assert got["mm_token_type_ids"][0].tolist() == [2 if t == video_id else 0 for t in want]


# ------------------------------------------------------------------------------------------------ pipeline


def test_videoqa_unpruned_equals_generate_on_the_same_frames(demo_qwen):
    model, proc = demo_qwen
    qa = VideoQA(model, proc, method="none", num_frames=8, max_new_tokens=4, **SMALL)
    result = qa.answer(MP4, "what is in the top left at the start?")
    assert result.frames == S.uniform_indices(1441, 8)
    frames, _ = D.read_frames(MP4, result.frames)
    times = Q.FrameTimes(tuple(result.frames), 24.0, 1441)
    inputs = Q.numpy_inputs(model, proc, frames, times, "what is in the top left at the start?", qa.settings)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert result.text == proc.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    s = result.stats
    assert s.video_tokens == s.tokens_kept == s.tokens_requested == 4 * 16 * 18 // 4
    assert set(s.seconds) == {"decode", "frame_selection", "vision", "prefill", "generation"}
    assert s.seconds["decode"] > 0 and s.seconds["vision"] > 0 and s.seconds["prefill"] > 0
    assert (s.video_fps, s.video_frames) == (24.0, 1441)


def test_videoqa_evs_keeps_exactly_the_requested_count_and_leaves_the_model_clean(demo_qwen):
    model, proc = demo_qwen
    hooks_before = len(model._forward_hooks) + len(model._forward_pre_hooks)
    qa = VideoQA(model, proc, method="evs", keep=0.3, num_frames=16, max_new_tokens=3, **SMALL)
    s = qa.answer(MP4, "which shape moved?").stats
    grid = (8, 16, 18)
    assert s.grid_thw == grid and s.video_tokens == 8 * 16 * 18 // 4
    assert s.tokens_requested == retained_count(grid, 0.7, spatial_merge_size=2) == s.tokens_kept
    assert s.prune["visual_tokens_out"] == s.tokens_kept
    assert len(model._forward_hooks) + len(model._forward_pre_hooks) == hooks_before


class _FixedScorer:
    """A FrameScorer whose relevance is a known function of the frame (its mean red), for checking the plumbing."""

    batch_size = 16

    def __init__(self):
        self.seen = self.calls = 0

    def score(self, frames, text):
        self.seen += len(frames)
        self.calls += 1
        return torch.from_numpy(frames[..., 0].reshape(len(frames), -1).mean(1).astype(np.float32))


@pytest.mark.parametrize("sampler", ["clip_topk", "bolt", "aks"])
def test_relevance_samplers_pick_from_scored_candidates(demo_qwen, sampler):
    model, proc = demo_qwen
    scorer = _FixedScorer()
    qa = VideoQA(model, proc, method="evs", keep=0.5, num_frames=4, sampler=sampler, scorer=scorer,
                 max_new_tokens=2, **SMALL)  # fmt: skip
    result = qa.answer(MP4, "where is the dog?")
    candidates = S.candidate_indices(1441, 24.0, 4)  # 60 at 1 fps
    assert scorer.seen == len(candidates) == 60 and scorer.calls == 4  # batches of 16
    small, _ = D.read_frames(MP4, candidates)
    from vlm_prune.pipelines.video_qa import _resize_short

    sim = scorer.score(_resize_short(small, 224), "").numpy()
    assert result.frames == [candidates[p] for p in S.select(sampler, sim, 4)]
    assert result.stats.seconds["frame_selection"] > 0


def test_unsupported_family_is_refused_with_what_to_do(demo_qwen):
    from vlm_prune.toy_models import build_tiny

    with pytest.raises(Exception, match="VideoQA builds video inputs for"):
        VideoQA(build_tiny("llava_next"), demo_qwen[1])


def test_memory_cap_is_checked_before_decoding(demo_qwen, monkeypatch):
    model, proc = demo_qwen

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the memory check")

    monkeypatch.setattr(D, "read_frames", no_decoding)
    qa = VideoQA(model, proc, num_frames=16, max_vision_patches=1000, **SMALL)
    with pytest.raises(VideoMemoryError, match=r"lower num_frames \(to <= 2 at this size\) or max_pixels"):
        qa.answer(MP4, "what?")  # 8 steps x 16 x 18 = 2304 patches > 1000


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_frames_input_on_qwen2_5_and_qwen3(demo_qwen, family):
    _, proc = demo_qwen
    model = _tiny_qwen(family, proc.tokenizer)
    frames = np.random.default_rng(1).integers(0, 255, (6, 32, 40, 3), dtype=np.uint8)
    indices = [0, 5, 10, 40, 41, 42]  # not evenly spaced
    qa = VideoQA(model, proc, method="evs", keep=0.5, num_frames=6, max_new_tokens=2, min_pixels=32 * 32,
                 max_pixels=32 * 40)  # fmt: skip
    with pytest.raises(Exception, match="fps"):
        qa.answer((frames, indices), "what?")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qa.answer(Frames(frames, indices, fps=10.0, total_frames=50), "what?")
    nonuniform = [w for w in caught if issubclass(w.category, Q.NonUniformFramesWarning)]
    assert len(nonuniform) == (1 if family == "qwen2_5_vl" else 0)
    assert result.frames == indices
    grid = (3, 8, 10)
    assert result.stats.grid_thw == grid
    assert result.stats.tokens_kept == result.stats.tokens_requested == retained_count(grid, 0.5, 2)


def test_processor_route_passes_original_indices_and_no_resampling(demo_qwen):
    """Where the processor's video processor loads (torchvision), the frames go to it as they are, with a
    VideoMetadata of the ORIGINAL indices and fps and do_sample_frames=False (here: the call it receives)."""
    _, proc = demo_qwen

    class Recording:
        chat_template = proc.chat_template
        video_processor = object()

        def apply_chat_template(self, *args, **kwargs):
            return proc.apply_chat_template(*args, **kwargs)

        def __call__(self, **kwargs):
            self.kwargs = kwargs
            return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    rec = Recording()
    assert Q.has_video_processor(rec) and not Q.has_video_processor(proc)
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    Q.processor_inputs(rec, frames, Q.FrameTimes((5, 50, 500), 25.0, 900), "why?")
    assert rec.kwargs["do_sample_frames"] is False
    (meta,) = rec.kwargs["video_metadata"]
    assert (meta.frames_indices, meta.fps, meta.total_num_frames) == ([5, 50, 500], 25.0, 900)
    assert meta.timestamps == [0.2, 2.0, 20.0]
    np.testing.assert_array_equal(rec.kwargs["videos"][0], frames)
    assert rec.kwargs["text"][0].count(Q.VIDEO_PAD) == 1


def test_videoqa_inputs_and_answer_equal_the_video_tasks(demo_qwen):
    """On a video-task clip given as frames, VideoQA builds the video task's own inputs and gives its answer."""
    import copy

    pytest.importorskip("easy_vqa")
    from vlm_prune.tasks import video as V

    model, proc = demo_qwen
    proc = copy.copy(proc)  # a chat template with a video slot, as a video model's processor has
    proc.chat_template = proc.chat_template.replace(
        "{% if c['type'] == 'image' %}", "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif c['type'] == 'image' %}",
    )  # fmt: skip
    sample = V.make_clips("test", 1, seed=0)[0]
    n = len(sample.video)
    qa = VideoQA(model, proc, method="none", num_frames=n, max_new_tokens=4)
    want = V.video_inputs(proc, [sample])
    got = Q.numpy_inputs(model, proc, sample.video, Q.FrameTimes(tuple(range(n)), 2.0, n), sample.question,
                         qa.settings)  # fmt: skip
    for key in ("input_ids", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    result = qa.answer(Frames(sample.video, list(range(n)), fps=2.0), sample.question)
    assert result.frames == list(range(n))
    assert result.text == V.generate_answers(model, proc, [sample])[0]


def test_frames_input_is_sampled_and_reports_original_indices(demo_qwen):
    model, proc = demo_qwen
    frames = np.random.default_rng(2).integers(0, 255, (10, 32, 40, 3), dtype=np.uint8)
    original = [3, 9, 15, 21, 27, 33, 39, 45, 51, 57]
    qa = VideoQA(model, proc, method="evs", keep=0.5, num_frames=4, max_new_tokens=2, min_pixels=32 * 32,
                 max_pixels=32 * 40)  # fmt: skip
    result = qa.answer((frames, original), "what?")  # Qwen2-VL needs no fps
    assert result.frames == [original[i] for i in S.uniform_indices(10, 4)] == [9, 21, 39, 51]
    with pytest.raises(Exception, match="original indices"):
        qa.answer((frames, original[:5]), "what?")


# ------------------------------------------------------------------------------------------------ frame change, CLI


def test_frame_change_scorer_is_the_mean_absolute_difference():
    from vlm_prune.video.scorers import FrameChangeScorer

    frames = np.zeros((4, 4, 6, 3), np.uint8)
    frames[1, :2] = 255  # frame 1: top half white -> differs from frame 0 in half the pixels
    frames[2] = frames[1]  # no change
    frames[3] = 51  # everything 51 (0.2): from frame 2, half the pixels move by 0.8 and half by 0.2
    got = FrameChangeScorer(stride=1).score(frames, "ignored").numpy()
    np.testing.assert_allclose(got, [0.5, 0.5, 0.0, 0.5 * 0.8 + 0.5 * 0.2], atol=1e-6)
    assert FrameChangeScorer(stride=2).score(frames[:1], "").tolist() == [0.0]


def test_cli_video_prints_the_videoqa_answer_frames_and_tokens(demo_qwen, capsys):
    import json

    from vlm_prune.cli import main
    from vlm_prune.video.scorers import FrameChangeScorer

    assert main(["video", "--sampler", "bolt", "--num-frames", "8", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    video_model = demo.demo_model("qwen2_vl_video")
    qa = VideoQA(*video_model, method="evs", keep=0.25, num_frames=8, sampler="bolt", scorer=FrameChangeScorer(),
                 max_new_tokens=3)  # fmt: skip
    want = qa.answer(MP4, "what is in the top left at the start?")
    assert out["video"] == MP4 and out["scorer"] == "frame_change"
    assert (out["answer"], out["frames"]) == (want.text, want.frames)
    s = out["stats"]
    assert s["tokens_kept"] == s["tokens_requested"] == want.stats.tokens_kept < s["video_tokens"]
    assert set(s["seconds"]) == {"decode", "frame_selection", "vision", "prefill", "generation"}
    assert main(["video", MP4, "--method", "none", "--num-frames", "4", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "frames:   4 by uniform: [180, 540, 900, 1260]" in text and "tokens:   " in text


# ------------------------------------------------------------------------------------------------ LLaVA video


class _ToyProcessor:
    """Tokenizer + chat template for the toy LLaVA video models (their media ids: <image> 3, <video> 4)."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        from vlm_prune.toy_models import TINY_VOCAB

        specials = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<vs>", "<ve>"]
        words = ["USER", ":", "ASSISTANT", "what", "moved", "?", "is", "red"]
        vocab = {w: i for i, w in enumerate(specials + words)}
        vocab.update({f"w{i}": i for i in range(len(vocab), TINY_VOCAB)})  # every id decodes
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.add_special_tokens(specials)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
        self.chat_template = self.tokenizer.chat_template = (
            "{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'video' %}<video>"
            "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT :"
        )

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_llava_video_families_answer_frames_with_original_indices(family):
    """VideoQA on the tiny LLaVA-OneVision / NeXT-Video configs: frames at the tower's size are prepared exactly
    ((x / 255 - mean) / std), the prompt holds frames x pooled grid video tokens (+ OneVision's newline), and the
    answer and kept count equal generate() on those hand-built inputs under the same pruning."""
    from vlm_prune.toy_models import VIDEO_ID, build_tiny
    from vlm_prune.video import llava_inputs as L

    model, proc = build_tiny(family), _ToyProcessor()
    size = model.config.vision_config.image_size  # 40 (OneVision: 5x5 patches) / 32 (NeXT-Video: 4x4)
    frames = np.random.default_rng(4).integers(0, 255, (7, size, size, 3), dtype=np.uint8)
    original = [0, 3, 4, 10, 30, 31, 60]  # not evenly spaced: neither family encodes time
    qa = VideoQA(model, proc, method="evs", keep=0.5, num_frames=4, max_new_tokens=3)
    result = qa.answer(Frames(frames, original, fps=5.0, total_frames=61), "what moved ?")
    picked = S.uniform_indices(7, 4)
    assert result.frames == [original[i] for i in picked]
    rows, cols = (3, 3) if family == "llava_onevision" else (2, 2)  # ceil(5 / 2) / 4 // stride 2
    grid, newline = (4, rows, cols), int(family == "llava_onevision")
    s = result.stats
    assert s.grid_thw == grid and s.video_tokens == 4 * rows * cols
    assert s.tokens_requested == retained_count(grid, 0.5) == s.tokens_kept < s.video_tokens

    mean, std = np.asarray(L.OPENAI_CLIP_MEAN, np.float32), np.asarray(L.OPENAI_CLIP_STD, np.float32)
    pixels = ((frames[picked].astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    tok = proc.tokenizer
    head = tok("USER :", add_special_tokens=False)["input_ids"]
    tail = tok(" what moved ? ASSISTANT :", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + [VIDEO_ID] * (4 * rows * cols + newline) + tail])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos": torch.from_numpy(np.ascontiguousarray(pixels))[None]}  # fmt: skip
    import vlm_prune

    with torch.no_grad(), vlm_prune.pruned(model, "evs", keep=0.5) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert handle.stats.visual_tokens_out == s.tokens_kept
    assert result.text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    fit = 40 // (size // 8) ** 2  # 40 patches over 25 (OneVision) / 16 (NeXT-Video) per frame
    with pytest.raises(VideoMemoryError, match=rf"lower num_frames \(to <= {fit}\)"):
        VideoQA(model, proc, num_frames=4, max_vision_patches=40).answer((frames, original), "what ?")
    with pytest.raises(Exception, match="max_pixels do not apply"):
        VideoQA(model, proc, max_pixels=1000)


def test_llava_frames_are_resized_as_the_families_video_processors():
    """OneVision squashes a frame to the square; NeXT-Video resizes the short side and centre-crops."""
    from vlm_prune.toy_models import build_tiny
    from vlm_prune.video import llava_inputs as L

    frame = np.zeros((1, 32, 64, 3), np.uint8)
    frame[:, :, :16] = 255  # a white left quarter
    nv = L.settings_for(build_tiny("llava_next_video"), _ToyProcessor())  # 32 px: the crop keeps columns 16..47
    x = L.prepare_frames(frame, nv)
    assert x.shape == (1, 3, 32, 32)
    black = (0 - L.OPENAI_CLIP_MEAN[0]) / L.OPENAI_CLIP_STD[0]
    np.testing.assert_allclose(x[0, 0, :, 4:], black, atol=1e-5)  # the white quarter is cropped away
    ov = L.settings_for(build_tiny("llava_onevision"), _ToyProcessor())  # 40 px: squashed, left quarter stays
    y = L.prepare_frames(frame, ov)
    assert y.shape == (1, 3, 40, 40) and (y[0, 0, :, :8] > 1.5).all() and (y[0, 0, :, 12:] < -1.5).all()

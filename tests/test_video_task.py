"""The video task: deterministic, leak-free, answers that follow the event record and the pixels, and Qwen2-VL
video inputs equal to a hand-built patchify and to transformers' own image processor."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("easy_vqa")

from vlm_prune import demo  # noqa: E402
from vlm_prune.errors import PruneError  # noqa: E402
from vlm_prune.tasks import video as V  # noqa: E402

PALETTE = {  # easy-VQA draws each colour with one exact RGB value
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0),
}  # fmt: skip


@pytest.fixture(scope="module")
def test_clips():
    return V.make_clips("test", 60, seed=3)


def _key(s: V.VideoSample):
    return (s.question, s.answer, s.qtype, s.cell, s.video.tobytes())


def test_make_clips_is_deterministic_and_prefix_stable():
    a = V.make_clips("test", 12, seed=5)
    b = V.make_clips("test", 12, seed=5)
    c = V.make_clips("test", 7, seed=5)
    assert [_key(x) for x in a] == [_key(x) for x in b]
    assert [_key(x) for x in a[:7]] == [_key(x) for x in c]
    assert [_key(x) for x in V.make_clips("test", 12, seed=6)] != [_key(x) for x in a]


def test_question_types_cycle_and_balance(test_clips):
    assert [s.qtype for s in test_clips[:5]] == list(V.QTYPES)
    assert set(Counter(s.qtype for s in test_clips).values()) == {len(test_clips) // len(V.QTYPES)}
    for q in ("start", "end"):  # asked cells: occupied and empty both occur
        answers = Counter(s.answer == V.NOTHING for s in test_clips if s.qtype == q)
        assert answers[True] > 0 and answers[False] > 0


def _images(clip: V.VideoClip):
    out = [c for c in clip.start if c is not None]
    for ev in clip.events:
        out += [ev.image] + ([ev.before] if ev.before is not None else [])
    return out


def test_train_and_test_clips_use_their_own_images_only(test_clips):
    train = V.make_clips("train", 60, seed=3)
    train_paths = {c.path for s in train for c in _images(s.clip)}
    test_paths = {c.path for s in test_clips for c in _images(s.clip)}
    assert all(c.split == "train" for s in train for c in _images(s.clip))
    assert all(c.split == "test" for s in test_clips for c in _images(s.clip))
    assert not train_paths & test_paths
    assert all("/train/" in p for p in train_paths) and all("/test/" in p for p in test_paths)


def _replay(clip: V.VideoClip) -> list[dict[int, tuple[str, str]]]:
    """Hand-built: the board (cell -> (shape, colour)) at every step, from the start and the event record."""
    board = {i: (c.shape, c.color) for i, c in enumerate(clip.start) if c is not None}
    out = [dict(board)]
    for ev in sorted(clip.events, key=lambda e: e.step):
        if ev.kind == "appear":
            assert ev.cell not in board
            board[ev.cell] = (ev.image.shape, ev.image.color)
        elif ev.kind == "move":
            assert ev.cell not in board and ev.source in board
            board[ev.cell] = board.pop(ev.source)
        else:
            assert board[ev.cell] == (ev.before.shape, ev.before.color)
            assert ev.image.shape == ev.before.shape and ev.image.color != ev.before.color
            board[ev.cell] = (ev.image.shape, ev.image.color)
        out.append(dict(board))
    return out


def _expected(s: V.VideoSample) -> str:
    boards = _replay(s.clip)
    if s.qtype in ("start", "end"):
        got = boards[0 if s.qtype == "start" else -1].get(s.cell)
        return got[0] if got else "nothing"
    kind = {"appeared_last": "appear", "moved": "move", "recolored": "recolor"}[s.qtype]
    step = max(e.step for e in s.clip.events if e.kind == kind)
    ev = next(e for e in s.clip.events if e.step == step)
    shape, color = boards[step][ev.cell]
    return color if s.qtype == "appeared_last" else shape


def _cell_pixels(frame: np.ndarray, cell: int, px: int) -> np.ndarray:
    r, c = divmod(cell, 2)
    return frame[r * px : (r + 1) * px, c * px : (c + 1) * px].reshape(-1, 3)


def test_answers_follow_the_event_record(test_clips):
    for s in test_clips:
        assert s.answer == _expected(s), (s.question, s.clip.events)
        assert [e.step for e in s.clip.events] == [1, 2, 3]
        assert sorted(e.kind for e in s.clip.events) in [sorted(t) for t in V.TEMPLATES]


def test_frames_show_the_replayed_boards(test_clips):
    """Pixels: an empty cell is pure background; an occupied one shows its colour's exact RGB value most of all
    non-background pixels; each state lasts frames_per_step identical frames; only event cells change."""
    for s in test_clips[:25]:
        clip, px = s.clip, s.clip.cell_px
        assert s.video.shape == (8, 2 * px, 2 * px, 3) and s.video.dtype == np.uint8
        bg = np.asarray(clip.background)
        boards = _replay(clip)
        for t, board in enumerate(boards):
            f0, f1 = s.video[2 * t], s.video[2 * t + 1]
            assert np.array_equal(f0, f1)
            for cell in range(4):
                pix = _cell_pixels(f0, cell, px)
                off = pix[np.abs(pix.astype(int) - bg).max(1) > 0]
                if cell not in board:
                    assert len(off) == 0
                    continue
                values, counts = np.unique(off, axis=0, return_counts=True)
                assert tuple(values[counts.argmax()]) == PALETTE[board[cell][1]]
            if t:
                changed = {c for c in range(4) if not np.array_equal(
                    _cell_pixels(f0, c, px), _cell_pixels(s.video[2 * t - 1], c, px))}  # fmt: skip
                ev = clip.events[t - 1]
                assert changed == {ev.cell} | ({ev.source} if ev.kind == "move" else set())


def _hand_patchify(video: np.ndarray, s: V.VideoSettings) -> np.ndarray:
    """Row per merged-window patch, written out with explicit loops (Qwen2-VL's documented order)."""
    x = (video.astype(np.float64) * s.rescale_factor - np.asarray(s.image_mean)) / np.asarray(s.image_std)
    p, m, tps = s.patch_size, s.merge_size, s.temporal_patch_size
    frames, h, w, _ = video.shape
    rows = []
    for t in range(frames // tps):
        for bh in range(h // p // m):
            for bw in range(w // p // m):
                for mh in range(m):
                    for mw in range(m):
                        y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                        row = [x[t * tps + tt, y0 + py, x0 + px_, ch] for ch in range(3) for tt in range(tps)
                               for py in range(p) for px_ in range(p)]  # fmt: skip
                        rows.append(row)
    return np.asarray(rows)


SETTINGS = V.VideoSettings(4, 2, 2, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                           1 / 255, 8 * 16, 8 * 16)  # fmt: skip


def test_preprocess_video_equals_a_hand_built_patchify():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(4, 8, 16, 3), dtype=np.uint8)  # not square: h and w must not swap
    pv, grid = V.preprocess_video(video, SETTINGS)
    assert grid == (2, 2, 4)
    assert pv.shape == (2 * 2 * 4, 3 * 2 * 4 * 4) and pv.dtype == np.float32
    np.testing.assert_allclose(pv, _hand_patchify(video, SETTINGS), rtol=0, atol=1e-5)
    # an odd frame count repeats the last frame
    pv3, grid3 = V.preprocess_video(video[:3], SETTINGS)
    assert grid3 == (2, 2, 4)
    np.testing.assert_allclose(pv3, _hand_patchify(np.concatenate([video[:3], video[2:3]]), SETTINGS), atol=1e-5)


def test_one_static_step_equals_transformers_image_processor():
    """A 2-frame still equals Qwen2-VL's own image processor on that image (it repeats an image over the temporal
    patch); torchvision-free, so it runs here."""
    import transformers

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    ip = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 256, "longest_edge": 256}
    )
    from PIL import Image

    ref = ip(images=[Image.fromarray(frame)], return_tensors="np")
    pv, grid = V.preprocess_video(np.stack([frame, frame]), V.video_settings(ip))
    assert list(ref["image_grid_thw"][0]) == list(grid)
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-5)


VIDEO_BUILT = (demo.demo_model_path("qwen2_vl_video") / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def video_model():
    if not VIDEO_BUILT:
        pytest.skip("the video demo model is not built yet")
    torch.manual_seed(0)
    return demo.demo_model("qwen2_vl_video")


@pytest.fixture(scope="module")
def any_model():
    """The video demo model, or (before it is built) the image demo model with a chat template that places a
    video and 64x64 frames: enough for the mechanics of inputs and batched generation."""
    torch.manual_seed(0)
    if VIDEO_BUILT:
        return demo.demo_model("qwen2_vl_video")
    model, processor = demo.demo_model("qwen2_vl")
    processor.chat_template = processor.chat_template.replace(
        "{% elif c['type'] == 'text' %}",
        "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}",
    )
    processor.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
    return model, processor


def test_video_inputs_token_counts_match_the_grid(any_model):
    _, processor = any_model
    samples = V.make_clips("test", 3, seed=0)
    inputs = V.video_inputs(processor, samples)
    vid = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[4, 16, 16]] * 3
    per = (grid.prod(-1) // 4).tolist()
    assert (inputs["input_ids"] == vid).sum(1).tolist() == per == [256] * 3
    assert inputs["pixel_values_videos"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == vid).long() * 2)
    mask = inputs["attention_mask"]
    assert bool((mask[:, -1] == 1).all())  # left padding
    assert bool((mask.cumsum(1)[:, :-1] <= mask.cumsum(1)[:, 1:]).all())
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "questions of different lengths exercise the padding"
    long = V.video_inputs(processor, V.make_clips("test", 1, seed=0, frames_per_step=4))  # 16 frames
    assert long["video_grid_thw"].tolist() == [[8, 16, 16]]
    assert int((long["input_ids"] == vid).sum()) == 8 * 16 * 16 // 4


def test_batched_generate_equals_one_at_a_time(any_model):
    model, processor = any_model
    samples = V.make_clips("test", 5, seed=11)[:4]
    batched = V.generate_answers(model, processor, samples, batch_size=4)
    single = [V.generate_answers(model, processor, [s], batch_size=1)[0] for s in samples]
    assert batched == single


def test_shipped_video_model_answers_held_out_clips(video_model):
    model, processor = video_model
    assert model.config.text_config.num_hidden_layers >= 8
    samples = V.make_clips("test", 50, seed=0)
    res = V.score(V.generate_answers(model, processor, samples, batch_size=25), samples)
    assert res["accuracy"] >= MIN_ACCURACY, res
    for q, r in res["per_qtype"].items():
        assert r["accuracy"] >= MIN_PER_TYPE, (q, res)


MIN_ACCURACY, MIN_PER_TYPE = 0.9, 0.8  # shipped model on this sample: 0.96, each type >= 0.9 (demo_video_model.md)


def test_score_counts_per_type():
    samples = V.make_clips("test", 5, seed=0)
    answers = [s.answer for s in samples]
    answers[1] = "wrong"
    res = V.score(answers, samples)
    assert res["correct"] == 4 and res["n"] == 5
    assert res["per_qtype"][samples[1].qtype] == {"accuracy": 0.0, "n": 1, "correct": 0}
    with pytest.raises(PruneError, match="answers for 5 samples"):
        V.score(answers[:2], samples)

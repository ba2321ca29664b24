"""The open_clip FrameScorer backend (the `clip` extra) against open_clip's own logits, offline: a tiny config
registered with `open_clip.add_model_config` and `pretrained=None` (random weights, seeded).

open_clip imports torchvision at module level, so this file runs in its own environment (scripts/open_clip_env.sh
builds .venv-clip: torch 2.14.1 + torchvision 0.29.1; scripts/test.sh runs it there). In an environment without
open_clip it skips with that reason; the env script fails loudly if open_clip does not import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip is not installed here: run `bash scripts/open_clip_env.sh`, then "
    "`.venv-clip/bin/python -m pytest tests/test_open_clip.py`",
)  # fmt: skip

from vlm_prune.video.scorers import OpenClipScorer  # noqa: E402

torch.set_num_threads(1)
NAME = "vlm-prune-tiny-clip"
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip") / f"{NAME}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    assert NAME in open_clip.list_models()
    torch.manual_seed(0)
    return OpenClipScorer.create(NAME, pretrained=None, batch_size=3)


def _open_clip_logits(scorer: OpenClipScorer, frames: np.ndarray, text: str) -> torch.Tensor:
    """(N,) open_clip's own forward: logits_per_image[:, 0] / logit_scale (the cosine)."""
    from PIL import Image

    images = torch.stack([scorer.preprocess(Image.fromarray(f)) for f in frames])
    with torch.no_grad():
        out = scorer.model(images, open_clip.get_tokenizer(NAME)([text]))
    if isinstance(out, dict):
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        img, txt, scale = out[:3]
    logits_per_image = scale * img @ txt.T
    return (logits_per_image[:, 0] / scale).float()


def test_scores_are_open_clips_own_logits_in_any_batch_size(tiny):
    frames = np.random.default_rng(0).integers(0, 255, (7, 40, 50, 3), dtype=np.uint8)
    text = "where is the red dog?"
    got = tiny.score(frames, text)
    assert got.shape == (7,) and got.dtype == torch.float32
    want = _open_clip_logits(tiny, frames, text)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(want.std()) > 1e-4  # the frames are told apart: a constant would not test the order
    whole = OpenClipScorer(tiny.model, tiny.preprocess, tiny.tokenizer, batch_size=32)
    torch.testing.assert_close(whole.score(frames, text), got, atol=1e-6, rtol=1e-6)
    other = tiny.score(frames, "a blue cat")
    assert not torch.allclose(other, got)  # the text matters


def test_bad_frames_and_batch_size_are_refused(tiny):
    from vlm_prune.video.scorers import ScorerError

    with pytest.raises(ScorerError, match=r"\(N, H, W, 3\)"):
        tiny.score(np.zeros((2, 8, 8), np.uint8), "x")
    with pytest.raises(ScorerError, match="batch_size"):
        OpenClipScorer(tiny.model, tiny.preprocess, tiny.tokenizer, batch_size=0)


def test_videoqa_clip_topk_picks_open_clips_most_similar_frames(tiny):
    from vlm_prune import demo
    from vlm_prune.pipelines import Frames, VideoQA
    from vlm_prune.video import samplers as S

    model, proc = demo.demo_model("qwen2_vl")
    frames = np.random.default_rng(3).integers(0, 255, (12, 32, 40, 3), dtype=np.uint8)
    original = list(range(0, 120, 10))
    question = "what is in the top left at the start?"
    qa = VideoQA(model, proc, method="evs", keep=0.5, num_frames=4, sampler="clip_topk", scorer=tiny,
                 score_fps=1.0, max_new_tokens=2, min_pixels=32 * 32, max_pixels=32 * 40)  # fmt: skip
    result = qa.answer(Frames(frames, original, fps=1.0), question)
    want = _open_clip_logits(tiny, frames, question).numpy()
    top = sorted(np.argsort(-want, kind="stable")[:4].tolist())
    assert result.frames == [original[i] for i in top] == [original[i] for i in S.clip_topk(want, 4)]
    assert result.stats.tokens_kept == result.stats.tokens_requested < result.stats.video_tokens

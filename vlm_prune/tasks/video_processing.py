"""Qwen2-VL video inputs without torchvision, batched generation and scoring for the video task.

transformers' `Qwen2VLVideoProcessor` imports torchvision, which this project cannot install, so
`preprocess_video` reproduces its output in numpy: rescale by 1/255, normalise with the mean/std, split into
temporal patches of `temporal_patch_size` frames and spatial patches of `patch_size` pixels, and order the rows
merge-window by merge-window exactly as `Qwen2VLVideoProcessor.patchify` does (transformers 5.x,
`models/qwen2_vl/video_processing_qwen2_vl.py`): the video viewed as
(t, tps, C, h/m, m, p, w/m, m, p) is permuted to (t, h/m, w/m, m, m, C, tps, p, p). Frames whose size is not
the processor's target size (`smart_resize`) are resized with PIL bicubic first (torchvision's bicubic can
differ by a grey level); the video task's frames are already at the target size, so no resize happens there.

`video_inputs(processor, samples)` gives the padded batch `model.generate(**inputs)` takes: `input_ids` (one
`<|video_pad|>` per merged token: t * h * w / merge**2), `attention_mask`, `mm_token_type_ids` (2 on video
tokens, as transformers' processors write them), `pixel_values_videos` and `video_grid_thw`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.mosaic import DataError


@dataclass(frozen=True)
class VideoSettings:
    """The numbers of a Qwen2-VL video processor that `preprocess_video` needs."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    min_pixels: int
    max_pixels: int


def video_settings(processor: Any) -> VideoSettings:
    """Settings of `processor.video_processor`, else of its image processor (Qwen2-VL uses the same numbers)."""
    part = getattr(processor, "video_processor", None) or getattr(processor, "image_processor", None) or processor
    size = getattr(part, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    lo = size.get("shortest_edge") or getattr(part, "min_pixels", None)
    hi = size.get("longest_edge") or getattr(part, "max_pixels", None)
    try:
        return VideoSettings(
            int(part.patch_size), int(part.merge_size), int(part.temporal_patch_size),
            tuple(float(v) for v in part.image_mean), tuple(float(v) for v in part.image_std),
            float(part.rescale_factor), int(lo), int(hi),
        )  # fmt: skip
    except (AttributeError, TypeError) as e:
        raise DataError(
            f"{type(processor).__name__} does not look like a Qwen2-VL processor (patch/merge/temporal sizes, "
            f"mean/std and size are needed): {e}"
        ) from e


def target_size(height: int, width: int, s: VideoSettings) -> tuple[int, int]:
    """The frame size Qwen2-VL's processor resizes to (its `smart_resize`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=s.patch_size * s.merge_size, min_pixels=s.min_pixels,
                        max_pixels=s.max_pixels)  # fmt: skip


def preprocess_video(video: np.ndarray, settings: VideoSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(pixel rows (t*h*w, C*tps*p*p) float32, grid (t, h, w)) of one uint8 video (frames, H, W, 3).

    A frame count that is not a multiple of `temporal_patch_size` is padded by repeating the last frame."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise DataError(f"a video must be a uint8 array (frames, H, W, 3); got shape {video.shape}")
    s = settings
    h, w = target_size(video.shape[1], video.shape[2], s)
    if (h, w) != video.shape[1:3]:
        from PIL import Image

        video = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in video])
    x = video.astype(np.float32) * np.float32(s.rescale_factor)
    x = (x - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # (F, C, H, W)
    if pad := -x.shape[0] % s.temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    p, m, tps = s.patch_size, s.merge_size, s.temporal_patch_size
    t, gh, gw = x.shape[0] // tps, h // p, w // p
    x = x.reshape(t, tps, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t * gh * gw, 3 * tps * p * p)), (t, gh, gw)


def build_video_prompt(processor: Any, question: str) -> str:
    """The prompt for one video followed by `question`, in the processor's chat format."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


def video_inputs(
    processor: Any,
    samples: Sequence[Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    questions: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded Qwen2-VL video inputs for one (video, question) per sample.

    `samples` need `.video` ((frames, H, W, 3) uint8) and `.question` (or pass `questions`). Returns
    input_ids / attention_mask / mm_token_type_ids (B, L), pixel_values_videos (sum of t*h*w, C*tps*p*p) in
    `dtype`, video_grid_thw (B, 3), all on `device`."""
    tok = getattr(processor, "tokenizer", processor)
    s = video_settings(processor)
    video_token = getattr(processor, "video_token", None) or "<|video_pad|>"
    video_id = tok.convert_tokens_to_ids(video_token)
    questions = list(questions) if questions is not None else [x.question for x in samples]
    if len(questions) != len(samples):
        raise DataError(f"{len(samples)} samples but {len(questions)} questions")
    rows, grids, texts = [], [], []
    for sample, q in zip(samples, questions, strict=True):
        pv, grid = preprocess_video(sample.video, s)
        rows.append(pv)
        grids.append(grid)
        n_tokens = grid[0] * grid[1] * grid[2] // (s.merge_size**2)
        prompt = build_video_prompt(processor, q)
        if prompt.count(video_token) != 1:
            raise DataError(f"the chat template must put one {video_token} per video; got {prompt!r}")
        texts.append(prompt.replace(video_token, video_token * n_tokens))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):  # left padding, for batched generate
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    for row, grid in zip(ids, grids, strict=True):
        if row.count(video_id) != grid[0] * grid[1] * grid[2] // s.merge_size**2:
            raise DataError("the tokenizer split the video placeholders; it must know <|video_pad|> as one token")
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "mm_token_type_ids": ((input_ids == video_id).long() * 2).to(device),
        "pixel_values_videos": torch.from_numpy(np.concatenate(rows)).to(device=device, dtype=dtype),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long, device=device),
    }


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, samples: Sequence[Any], batch_size: int = 16, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers (decoded new tokens, stripped) of `model` to each sample, batched with left padding."""
    from ..demo import _device_and_dtype

    device, dtype = _device_and_dtype(model)
    tok = getattr(processor, "tokenizer", processor)
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        inputs = video_inputs(processor, samples[i : i + batch_size], device=device, dtype=dtype)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, inputs["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


def score(answers: Sequence[str], samples: Sequence[Any]) -> dict:
    """Exact-match accuracy (first word, lower case) overall and per question type.

    Returns {"accuracy", "n", "correct", "per_qtype": {qtype: {"accuracy", "n", "correct"}}}."""
    from ..demo import normalize_answer

    if len(answers) != len(samples):
        raise DataError(f"{len(answers)} answers for {len(samples)} samples")
    ok = [normalize_answer(a) == normalize_answer(s.answer) for a, s in zip(answers, samples, strict=True)]

    def part(idx: list[int]) -> dict:
        c = sum(ok[i] for i in idx)
        return {"accuracy": c / len(idx) if idx else float("nan"), "n": len(idx), "correct": c}

    everything = part(list(range(len(samples))))
    per = {q: part([i for i, s in enumerate(samples) if s.qtype == q]) for q in dict.fromkeys(s.qtype for s in samples)}
    return {**everything, "per_qtype": per}


def evaluate(model: Any, processor: Any, samples: Sequence[Any], batch_size: int = 16) -> dict:
    """`score` of greedy `generate_answers`, plus the normalised predictions."""
    from ..demo import normalize_answer

    answers = generate_answers(model, processor, samples, batch_size=batch_size)
    return {**score(answers, samples), "predictions": [normalize_answer(a) for a in answers]}

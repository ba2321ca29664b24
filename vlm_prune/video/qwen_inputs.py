"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL inputs for one video and one question, with true frame times.

Two routes give the same tensors:
- `processor_inputs`: the model's own processor, when its video processor loads (it needs torchvision):
  `processor(text, videos=[frames], video_metadata=[VideoMetadata(...)], do_sample_frames=False)`.
- `numpy_inputs`: without torchvision (this project's CPU install), pixel rows from
  `vlm_prune.tasks.video_processing.preprocess_video` and the placeholder text built here as transformers'
  processors write it.

Frame times:
- Qwen3-VL writes `<t seconds>` before every temporal step, t the mean time of its `temporal_patch_size`
  frames (the last frame repeated to fill the step), time = ORIGINAL frame index / container fps
  (`Qwen3VLProcessor._calculate_timestamps`). The frames are passed with a `VideoMetadata` holding the original
  indices and the fps, and `do_sample_frames=False`, so the stamps are true for any frame choice.
- Qwen2.5-VL places temporal step t at M-RoPE time t * second_per_grid_ts * tokens_per_second, one number per
  video: `second_per_grid_ts = temporal_patch_size / sampled_fps`, sampled_fps = k / N * fps (as its
  processor computes it). That is exact for evenly spaced frames only: for any other choice
  `warn_if_nonuniform` issues a `NonUniformFramesWarning` that says the times are approximate.
- Qwen2-VL's M-RoPE time is the step index: it has no notion of seconds at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..tasks.video_processing import VideoSettings, preprocess_video, target_size, video_settings
from .samplers import is_uniform

QWEN_VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class NonUniformFramesWarning(UserWarning):
    """Frames that are not evenly spaced, given to a model whose video positions assume they are."""


@dataclass(frozen=True)
class FrameTimes:
    """Where the chosen frames sit in the original video: indices (k,) sorted, container fps and length."""

    indices: tuple[int, ...]
    fps: float
    total_frames: int

    def metadata(self, height: int, width: int, backend: str | None = None):
        """transformers' `VideoMetadata` with the ORIGINAL frame indices."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=int(self.total_frames), fps=float(self.fps), width=int(width), height=int(height),
            duration=self.total_frames / self.fps if self.fps else None, video_backend=backend,
            frames_indices=list(self.indices),
        )  # fmt: skip

    @property
    def sampled_fps(self) -> float:
        """k / N * fps, as `VideoMetadata.sampled_fps`."""
        return len(self.indices) / self.total_frames * self.fps


def family_of(model: Any) -> str:
    """ "qwen2_vl" / "qwen2_5_vl" / "qwen3_vl" from the config's model_type, else the model_type itself."""
    return str(getattr(model.config, "model_type", type(model).__name__))


def step_timestamps(times: FrameTimes, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal step: mean of its frames' index / fps, the last frame repeated to fill a step."""
    idx = list(times.indices)
    if pad := -len(idx) % temporal_patch_size:
        idx += [idx[-1]] * pad
    secs = [i / times.fps for i in idx]
    tps = temporal_patch_size
    return [(secs[i] + secs[i + tps - 1]) / 2 for i in range(0, len(secs), tps)]


def second_per_grid_ts(times: FrameTimes, temporal_patch_size: int) -> float:
    """Qwen2.5-VL's seconds per temporal step: temporal_patch_size / sampled_fps."""
    return temporal_patch_size / times.sampled_fps


def warn_if_nonuniform(family: str, times: FrameTimes, sampler: str = "the sampler") -> bool:
    """Warn (NonUniformFramesWarning) when Qwen2.5-VL is given unevenly spaced frames. Returns whether it warned."""
    if family != "qwen2_5_vl" or is_uniform(times.indices):
        return False
    gaps = np.diff(np.asarray(times.indices))
    warnings.warn(
        f"Qwen2.5-VL places video frames at evenly spaced times (one second_per_grid_ts per video), but the "
        f"{len(times.indices)} frames chosen by {sampler} are {int(gaps.min())}-{int(gaps.max())} frames apart: "
        "the model sees their times only approximately (average spacing). Use sampler='uniform' for exact times, "
        "or a Qwen3-VL model, whose <t seconds> stamps are exact for any frames.",
        NonUniformFramesWarning,
        stacklevel=3,
    )
    return True


def video_prompt(processor: Any, question: str) -> str:
    """The chat prompt for one video then `question`; Qwen's raw format when the template has no video slot."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if prompt.count(VIDEO_PAD) == 1:
            return prompt
    return f"<|im_start|>user\n{VISION_START}{VIDEO_PAD}{VISION_END}{question}<|im_end|>\n<|im_start|>assistant\n"


def placeholder(family: str, grid: tuple[int, int, int], merge_size: int, timestamps: Sequence[float]) -> str:
    """The text that replaces the prompt's one `<|video_pad|>`, as transformers' processors write it.

    Qwen2/2.5-VL: t*h*w / merge**2 video tokens. Qwen3-VL: per temporal step `<t seconds>` then
    vision_start, h*w / merge**2 video tokens, vision_end."""
    t, h, w = grid
    per_step = h * w // merge_size**2
    if family != "qwen3_vl":
        return VIDEO_PAD * (t * per_step)
    return "".join(f"<{ts:.1f} seconds>{VISION_START}{VIDEO_PAD * per_step}{VISION_END}" for ts in timestamps)


def settings_for(processor: Any, model: Any, min_pixels: int | None, max_pixels: int | None) -> VideoSettings:
    """The processor's video settings, checked against the model's vision tower, with optional pixel bounds."""
    s = video_settings(processor)
    vision = getattr(model.config, "vision_config", None)
    want = {k: getattr(vision, k, None) for k in ("patch_size", "temporal_patch_size", "spatial_merge_size")}
    have = dict(patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, spatial_merge_size=s.merge_size)
    bad = {k: (have[k], v) for k, v in want.items() if v is not None and have[k] != v}
    if bad:
        raise InputError(f"the processor and the model's vision tower disagree on {bad} (processor, model): pass "
                         "the model's own processor")  # fmt: skip
    if min_pixels is not None or max_pixels is not None:
        lo = s.min_pixels if min_pixels is None else int(min_pixels)
        hi = s.max_pixels if max_pixels is None else int(max_pixels)
        s = replace(s, min_pixels=min(lo, hi), max_pixels=hi)
    return s


def grid_for(height: int, width: int, num_frames: int, s: VideoSettings) -> tuple[int, int, int]:
    """(t, h, w) vision grid for num_frames frames of height x width, before decoding them."""
    h, w = target_size(height, width, s)
    t = -(-num_frames // s.temporal_patch_size)
    return t, h // s.patch_size, w // s.patch_size


def numpy_inputs(
    model: Any, processor: Any, frames: np.ndarray, times: FrameTimes, question: str, settings: VideoSettings
) -> dict[str, torch.Tensor]:
    """Inputs of one (video, question) without torchvision: input_ids / attention_mask / mm_token_type_ids (1, L),
    pixel_values_videos (t*h*w, C*tps*p*p), video_grid_thw (1, 3), and second_per_grid_ts (1,) on Qwen2.5-VL."""
    family = family_of(model)
    if family not in QWEN_VIDEO_FAMILIES:
        raise InputError(
            f"{family} video inputs need its own video processor, which needs torchvision here; "
            f"without it VideoQA builds inputs for {QWEN_VIDEO_FAMILIES}"
        )
    tok = getattr(processor, "tokenizer", processor)
    rows, grid = preprocess_video(frames, settings)
    stamps = step_timestamps(times, settings.temporal_patch_size)
    text = video_prompt(processor, question).replace(VIDEO_PAD, placeholder(family, grid, settings.merge_size, stamps))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    video_id = tok.convert_tokens_to_ids(VIDEO_PAD)
    if int((ids == video_id).sum()) != grid[0] * grid[1] * grid[2] // settings.merge_size**2:
        raise InputError(f"the tokenizer split the video placeholders; it must know {VIDEO_PAD} as one token")
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == video_id).long() * 2,
        "pixel_values_videos": torch.from_numpy(rows),
        "video_grid_thw": torch.tensor([grid], dtype=torch.long),
    }
    if family == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([second_per_grid_ts(times, settings.temporal_patch_size)])
    return out


def processor_inputs(
    processor: Any, frames: np.ndarray, times: FrameTimes, question: str, backend: str | None = None
) -> dict[str, torch.Tensor]:
    """Inputs from the processor itself (its video processor must load: torchvision), frames as given."""
    meta = times.metadata(frames.shape[1], frames.shape[2], backend)
    out = processor(
        text=[video_prompt(processor, question)], videos=[np.asarray(frames)], video_metadata=[meta],
        do_sample_frames=False, return_tensors="pt",
    )  # fmt: skip
    return dict(out)


def has_video_processor(processor: Any) -> bool:
    """Whether the processor carries a working video processor (transformers' need torchvision)."""
    return getattr(processor, "video_processor", None) is not None

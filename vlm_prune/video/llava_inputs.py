"""LLaVA-OneVision / LLaVA-NeXT-Video inputs for one video and one question (the VideoQA front end).

Two routes give the model the same kind of tensors:
- `processor_inputs`: the model's own processor, when its video processor loads (transformers' video processors
  need torchvision): `processor(text, videos=[frames], do_sample_frames=False)`, frames as chosen.
- `numpy_inputs`: without torchvision, frames prepared as the families' video processors prepare them, with PIL:
  LLaVA-OneVision resizes every frame to the vision tower's square size (its `LlavaOnevisionVideoProcessor`:
  size = height x width, no crop); LLaVA-NeXT-Video resizes the short side to it and centre-crops the square
  (`LlavaNextVideoVideoProcessor`: shortest_edge + crop_size). Both bicubic, rescale 1/255, normalise with the
  processor's mean / std (OpenAI CLIP's when the processor has none). PIL's bicubic and torchvision's differ by
  a little on resized frames; frames already at the tower's size are prepared exactly.

Tokens (from the adapters, `vlm_prune.adapters.llava_video`): each frame is one pooled grid of
`frame_grid()` = (rows, cols) tokens; OneVision closes the video with one newline placeholder, which the engine
keeps as text. The prompt's one `<video>` becomes frames * rows * cols (+ 1 on OneVision) video tokens.

Frame times: neither family encodes time; frames are in order, one temporal step each, so any frame choice
(uniform or not) is shown as it is, with no warning needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError

LLAVA_VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LlavaVideoSettings:
    """How one family prepares video frames and how many tokens a frame becomes."""

    family: str
    size: int  # the vision tower's square input side
    crop: bool  # NeXT-Video: short side to `size`, then centre crop; OneVision: resize to size x size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_grid: tuple[int, int]  # pooled (rows, cols) tokens per frame
    trailing: int  # placeholders after the frames (OneVision's newline)
    patches_per_frame: int  # vision-tower patches per frame (memory cap)
    video_token: str

    def video_tokens(self, num_frames: int) -> int:
        """Video tokens the engine may prune: frames x rows x cols (OneVision's newline excluded)."""
        return num_frames * self.frame_grid[0] * self.frame_grid[1]


def settings_for(model: Any, processor: Any) -> LlavaVideoSettings:
    """The family's frame preparation and token counts, from the model config, its adapter and the processor."""
    from ..adapters import adapter_for

    family = str(model.config.model_type)
    if family not in LLAVA_VIDEO_FAMILIES:
        raise InputError(f"{family} is not a LLaVA video family {LLAVA_VIDEO_FAMILIES}")
    adapter = adapter_for(model)
    vision = model.config.vision_config
    source = getattr(processor, "video_processor", None) or getattr(processor, "image_processor", None)
    mean = tuple(float(v) for v in (getattr(source, "image_mean", None) or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (getattr(source, "image_std", None) or OPENAI_CLIP_STD))
    side = int(vision.image_size) // int(vision.patch_size)
    tok = getattr(processor, "tokenizer", processor)
    video_token = getattr(processor, "video_token", None) or tok.convert_ids_to_tokens(adapter.video_token_id)
    return LlavaVideoSettings(
        family=family, size=int(vision.image_size), crop=family == "llava_next_video", mean=mean, std=std,
        frame_grid=tuple(adapter.frame_grid()), trailing=int(adapter.video_trailing_tokens),
        patches_per_frame=side * side, video_token=str(video_token),
    )  # fmt: skip


def prepare_frames(frames: np.ndarray, s: LlavaVideoSettings) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, 3, size, size) float32, as the family's video processor (module docstring)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be (F, H, W, 3) uint8, got {frames.shape}")
    out = []
    for f in frames:
        h, w = f.shape[:2]
        if (h, w) != (s.size, s.size):
            img = Image.fromarray(f)
            if s.crop:  # transformers' sizes: the long side int(size * long / short), crop offsets rounded
                nh, nw = (s.size, int(s.size * w / h)) if h <= w else (int(s.size * h / w), s.size)
                img = img.resize((nw, nh), Image.BICUBIC)
                top, left = int(round((nh - s.size) / 2)), int(round((nw - s.size) / 2))
                img = img.crop((left, top, left + s.size, top + s.size))
            else:
                img = img.resize((s.size, s.size), Image.BICUBIC)
            f = np.asarray(img)
        out.append(f)
    x = np.stack(out).astype(np.float32) / 255.0
    x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def video_prompt(processor: Any, question: str, s: LlavaVideoSettings) -> str:
    """The chat prompt for one video then `question`, with ONE video placeholder (the processor's template)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    template_owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", None)
    if template_owner is None or not getattr(template_owner, "chat_template", None):
        raise InputError("the processor has no chat template: VideoQA builds LLaVA video prompts from it")
    prompt = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt.count(s.video_token) != 1:
        raise InputError(f"the chat template wrote {prompt.count(s.video_token)} {s.video_token!r} placeholders for "
                         "one video; it must write exactly one")  # fmt: skip
    return prompt


def numpy_inputs(model: Any, processor: Any, frames: np.ndarray, question: str, s: LlavaVideoSettings) -> dict:
    """input_ids / attention_mask (1, L) and pixel_values_videos (1, F, 3, size, size), without torchvision."""
    tok = getattr(processor, "tokenizer", processor)
    count = s.video_tokens(len(frames)) + s.trailing
    text = video_prompt(processor, question, s).replace(s.video_token, s.video_token * count)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    video_id = tok.convert_tokens_to_ids(s.video_token)
    if int((ids == video_id).sum()) != count:
        raise InputError(f"the tokenizer split the video placeholders; it must know {s.video_token} as one token")
    pixels = torch.from_numpy(prepare_frames(frames, s))[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def processor_inputs(processor: Any, frames: np.ndarray, question: str, s: LlavaVideoSettings) -> dict:
    """Inputs from the processor itself (its video processor loads: torchvision), frames as chosen."""
    out = processor(text=[video_prompt(processor, question, s)], videos=[np.asarray(frames)], do_sample_frames=False,
                    return_tensors="pt")  # fmt: skip
    return dict(out)

"""`Llava3DProcessor`: posed RGB-D views + text -> the inputs of `Llava3DForConditionalGeneration`.

Per scene it takes the views' RGB (V, H, W, 3) uint8, depth (V, H, W) float metres (0 = invalid), intrinsics
(V, 4, 4) or (4, 4), camera-to-world poses (V, 4, 4) and the axis alignment (4, 4). It

1. fits every view to the vision tower's S x S input as the authors' `RGBDVideoProcessor` does (ZCMax/LLaVA-3D):
   the short side resized to S (long side int(long * S / short)), then a centre crop; RGB bicubic, depth nearest
   (PIL NEAREST = torch "nearest-exact"), the intrinsics scaled and shifted by the crop offset. Deviation: one
   geometry for RGB and depth (the authors run CLIP's own resize for RGB next to theirs for depth), and the
   principal point follows the actual crop on both axes (theirs shifts cx by (W' - H') / 2 only);
2. computes the scene's voxel count from the geometry alone (`geometry.scene_geometry`: it does not depend on
   the CLIP features), with the model's voxel size, cap and cap seed;
3. replaces the prompt's one scene placeholder (`<image>`) by exactly that many, and tokenizes.

A prompt comes as text holding `<image>` (and `<boxes>` for a click), or as chat messages through
`apply_chat_template` (content items {"type": "scene"}, {"type": "image"}, {"type": "click"}, {"type": "text"}).
Without depth it is the 2-D mode: `images` (H, W, 3) uint8, one per prompt, each (S/p)^2 placeholders.
Rows with fewer views are padded with all-zero views (zero depth, so they add no voxel).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlm_prune.errors import InputError
from vlm_prune.models.llava3d.geometry import as_matrices, check_scene, scene_geometry

PROCESSOR_FILE = "llava3d_processor.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Vicuna-v1 style, as LLaVA-3D's conversation template ("USER: <image>\n... ASSISTANT:")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] in ('scene', 'image') %}<image>\n{% elif c['type'] == 'click' %}<boxes> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def fit_view(
    rgb: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize (short side -> size) and centre-crop one scene's views; returns rgb (V, 3, S, S) float in [0, 255],
    depth (V, S, S) and intrinsics (V, 4, 4) adjusted to the crop."""
    views, height, width = depth.shape
    image = rgb.permute(0, 3, 1, 2).float()
    intrinsics = intrinsics.clone()
    if (height, width) == (size, size):
        return image, depth.float(), intrinsics
    scale = size / min(height, width)
    new_h, new_w = (size, int(width * scale)) if height <= width else (int(height * scale), size)
    image = F.interpolate(image, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    image = image.clamp(0, 255)
    depth = F.interpolate(depth[:, None].float(), size=(new_h, new_w), mode="nearest-exact")[:, 0]
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    image = image[:, :, top : top + size, left : left + size]
    depth = depth[:, top : top + size, left : left + size]
    intrinsics[:, 0, :3] *= new_w / width
    intrinsics[:, 1, :3] *= new_h / height
    intrinsics[:, 0, 2] -= left
    intrinsics[:, 1, 2] -= top
    return image, depth, intrinsics


class Llava3DProcessor:
    """Builds LLaVA-3D inputs (see the module docstring).

    tokenizer: any transformers tokenizer in which `image_token` and `click_token` are single tokens.
    image_size / patch_size: the vision tower's input side S and patch p. voxel_size, max_voxels, voxel_seed:
    the model's (`Llava3DProcessor.for_model` copies them from a config).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int = 336,
        patch_size: int = 14,
        voxel_size: float = 0.2,
        max_voxels: int = 2560,
        voxel_seed: int = 0,
        image_token: str = "<image>",
        click_token: str = "<boxes>",
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        chat_template: str | None = None,
    ):
        if max_voxels < 1:
            raise InputError(f"the voxel cap must be at least 1, got max_voxels={max_voxels}")
        self.tokenizer = tokenizer
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.voxel_size, self.max_voxels, self.voxel_seed = float(voxel_size), int(max_voxels), int(voxel_seed)
        self.image_token, self.click_token = image_token, click_token
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.chat_template = chat_template or CHAT_TEMPLATE
        for token in (image_token, click_token):
            if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
                raise InputError(
                    f"the tokenizer splits {token!r} into several tokens; add it as a special token "
                    f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}}))"
                )
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.click_token_id = tokenizer.convert_tokens_to_ids(click_token)

    # ---- construction / persistence
    @classmethod
    def for_model(cls, config: Any, tokenizer: Any, **kwargs) -> Llava3DProcessor:
        """A processor matching a `Llava3DConfig` (image size, patch, voxel settings); checks the token ids."""
        processor = cls(
            tokenizer,
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            voxel_size=config.voxel_size,
            max_voxels=config.max_voxels,
            voxel_seed=config.voxel_seed,
            **kwargs,
        )
        if (processor.image_token_id, processor.click_token_id) != (config.image_token_id, config.click_token_id):
            raise InputError(
                f"the tokenizer maps {processor.image_token!r} / {processor.click_token!r} to "
                f"{processor.image_token_id} / {processor.click_token_id} but the model expects "
                f"{config.image_token_id} / {config.click_token_id}; use the tokenizer saved with the model"
            )
        return processor

    def settings(self) -> dict:
        return dict(
            image_size=self.image_size, patch_size=self.patch_size, voxel_size=self.voxel_size,
            max_voxels=self.max_voxels, voxel_seed=self.voxel_seed, image_token=self.image_token,
            click_token=self.click_token, image_mean=list(self.image_mean), image_std=list(self.image_std),
            chat_template=self.chat_template,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, PROCESSOR_FILE), "w") as handle:
            json.dump(self.settings(), handle, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> Llava3DProcessor:
        from transformers import AutoTokenizer

        path = os.path.join(folder, PROCESSOR_FILE)
        if not os.path.exists(path):
            raise InputError(f"{folder} holds no {PROCESSOR_FILE}; save one with Llava3DProcessor.save_pretrained")
        with open(path) as handle:
            settings = json.load(handle)
        settings.update(kwargs)
        return cls(AutoTokenizer.from_pretrained(folder), **settings)

    # ---- prompts
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Chat messages -> prompt text with one `<image>` per scene/image item and `<boxes>` per click."""
        from jinja2 import Template

        return Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (image / 255.0 - mean) / std

    def prepare_scene(self, rgb, depth, intrinsics, poses, axis_align=None) -> dict:
        """One scene -> pixel_values (V, 3, S, S), depths (V, S, S), intrinsics/poses (V, 4, 4), axis_align (4, 4)
        and its voxel count `num_voxels` (from the geometry alone)."""
        rgb = torch.as_tensor(rgb)
        depth = torch.as_tensor(depth, dtype=torch.float32)
        if rgb.ndim == 3 and depth.ndim == 2:  # a single view
            rgb, depth = rgb[None], depth[None]
        axis_align = torch.eye(4) if axis_align is None else torch.as_tensor(axis_align, dtype=torch.float32)
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise InputError(f"RGB views must be (views, H, W, 3) uint8, got shape {tuple(rgb.shape)}")
        check_scene(depth, intrinsics, poses, axis_align, rgb_shape=tuple(rgb.shape))
        views = depth.shape[0]
        intrinsics = as_matrices(intrinsics, views, "intrinsics").clone()
        poses = as_matrices(poses, views, "pose").clone()
        image, depth, intrinsics = fit_view(rgb, depth, intrinsics, self.image_size)
        geometry = scene_geometry(
            depth, intrinsics, poses, axis_align, self.grid, self.voxel_size, self.max_voxels, self.voxel_seed
        )
        return dict(
            pixel_values=self._normalize(image), depths=depth, intrinsics=intrinsics, poses=poses,
            axis_align=axis_align, num_voxels=len(geometry),
        )

    def _expand(self, text: str, count: int) -> str:
        found = text.count(self.image_token)
        if found != 1:
            raise InputError(
                f"a prompt must hold exactly one {self.image_token!r} scene placeholder, where the scene's tokens go; "
                f"this one holds {found}: {text[:80]!r}. Put {self.image_token!r} in the text, or build the prompt "
                "with apply_chat_template and a {'type': 'scene'} content item"
            )
        return text.replace(self.image_token, self.image_token * count)

    def __call__(
        self,
        text: str | list[str],
        rgb=None,
        depth=None,
        intrinsics=None,
        poses=None,
        axis_align=None,
        clicks=None,
        images=None,
        padding_side: str | None = None,
    ) -> dict:
        """Tokenized prompts and media; one scene (or, without depth, one image) per prompt.

        text: one prompt or a list. rgb / depth / intrinsics / poses / axis_align: one scene's arrays, or lists of
        them (one per prompt). clicks: (3,) or (C, 3) per prompt, or a list of them. images: 2-D mode.
        Returns input_ids, attention_mask, pixel_values, and for scenes depths, intrinsics, poses, axis_align
        ((B, V, ...) with V the most views of any row), plus clicks (B, C, 3) when given.
        """
        texts = [text] if isinstance(text, str) else list(text)
        batched = not isinstance(text, str)

        def per_row(value, name):
            if value is None:
                return [None] * len(texts)
            items = list(value) if batched else [value]
            if len(items) != len(texts):
                raise InputError(f"{len(texts)} prompts but {len(items)} {name}; pass one per prompt")
            return items

        out: dict[str, torch.Tensor] = {}
        if depth is None and rgb is not None:
            raise InputError("RGB views without depth: pass depth (views, H, W) in metres, or use images= (2-D mode)")
        if depth is not None:
            rows = zip(*(per_row(v, n) for v, n in ((rgb, "RGB scenes"), (depth, "depth scenes"),
                                                   (intrinsics, "intrinsics"), (poses, "poses"),
                                                   (axis_align, "axis alignments"))))
            scenes = []
            for rgb_i, depth_i, intr_i, pose_i, axis_i in rows:
                if rgb_i is None or intr_i is None or pose_i is None:
                    raise InputError("a scene needs rgb, depth, intrinsics and poses (axis_align defaults to identity)")
                scenes.append(self.prepare_scene(rgb_i, depth_i, intr_i, pose_i, axis_i))
            texts = [self._expand(t, s["num_voxels"]) for t, s in zip(texts, scenes)]
            views = max(s["depths"].shape[0] for s in scenes)
            out.update(_stack_scenes(scenes, views))
        elif images is not None:
            side = self.grid[0] * self.grid[1]
            pixel = []
            for image in per_row(images, "images"):
                image = torch.as_tensor(image)
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise InputError(f"an image must be (H, W, 3) uint8, got shape {tuple(image.shape)}")
                fake_depth = torch.ones(1, *image.shape[:2])
                fitted, _, _ = fit_view(image[None], fake_depth, torch.eye(4)[None], self.image_size)
                pixel.append(self._normalize(fitted)[0])
            texts = [self._expand(t, side) for t in texts]
            out["pixel_values"] = torch.stack(pixel)
        if clicks is not None:
            rows = [torch.as_tensor(c, dtype=torch.float32).reshape(-1, 3) for c in per_row(clicks, "click sets")]
            most = max(len(c) for c in rows)
            padded = torch.zeros(len(rows), most, 3)
            for b, c in enumerate(rows):
                padded[b, : len(c)] = c
            out["clicks"] = padded
        tokenizer = self.tokenizer
        previous = tokenizer.padding_side
        try:
            if padding_side is not None:
                tokenizer.padding_side = padding_side
            encoded = tokenizer(texts, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = previous
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **out}


def _stack_scenes(scenes: list[dict], views: int) -> dict:
    """Stack per-scene tensors, padding missing views with zero pixels / zero depth / identity matrices."""
    size = scenes[0]["depths"].shape[-1]
    batch = len(scenes)
    pixel = torch.zeros(batch, views, 3, size, size)
    depths = torch.zeros(batch, views, size, size)
    intrinsics = torch.eye(4).repeat(batch, views, 1, 1)
    poses = torch.eye(4).repeat(batch, views, 1, 1)
    for b, scene in enumerate(scenes):
        v = scene["depths"].shape[0]
        pixel[b, :v], depths[b, :v] = scene["pixel_values"], scene["depths"]
        intrinsics[b, :v], poses[b, :v] = scene["intrinsics"], scene["poses"]
    axis = torch.stack([scene["axis_align"] for scene in scenes])
    return dict(pixel_values=pixel, depths=depths, intrinsics=intrinsics, poses=poses, axis_align=axis)


__all__ = ["CHAT_TEMPLATE", "Llava3DProcessor", "fit_view"]

"""`Llava3DConfig`: LLaVA-3D (arXiv 2409.18125, ZCMax/LLaVA-3D) as a transformers-5 config.

A LLaVA-1.5 config (CLIP vision tower, Llama decoder, 2-layer GELU projector) plus the 3-D settings of the
authors' `RGBDVideoTower`: voxel size 0.2 m, the 2560-voxel cap (seeded here, see `geometry`), and the click
prompt token. The same placeholder token (`image_token_id`) marks the scene's voxel tokens (3-D mode) and an
image's patch tokens (2-D mode), as the authors' IMAGE_TOKEN_INDEX does; the processor emits one per token.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig


@strict
class Llava3DConfig(LlavaConfig):
    """LLaVA-3D config.

    Fields beyond `LlavaConfig`:
        voxel_size: voxel edge in metres (authors: 0.2).
        max_voxels: the cap on voxel tokens per scene (authors: 2560); must be >= 1.
        voxel_seed: seed of the cap's subset (a deviation: the authors' cap is unseeded).
        click_token_id: placeholder of a click prompt ([x, y, z] through the prompt encoder as one token).
        position_embedding_3d: whether scene patches get the 3-D position MLP (authors: always; 2-D images
            always get it multiplied by 0).
    """

    model_type = "llava3d"

    image_token_index: int = 32000
    click_token_id: int = 32001
    voxel_size: float = 0.2
    max_voxels: int = 2560
    voxel_seed: int = 0
    position_embedding_3d: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.max_voxels < 1:
            from vlm_prune.errors import InputError

            raise InputError(f"max_voxels (the voxel cap) must be at least 1, got {self.max_voxels}")
        if self.voxel_size <= 0:
            from vlm_prune.errors import InputError

            raise InputError(f"voxel_size must be a positive length in metres, got {self.voxel_size}")


__all__ = ["Llava3DConfig"]

"""`Llava3DForConditionalGeneration`: LLaVA-3D (arXiv 2409.18125) built from transformers-5 parts.

Pipeline (the authors' `LlavaMetaForCausalLM.encode_rgbd_videos`, ZCMax/LLaVA-3D; re-implemented, see
`geometry` for the conventions and the two documented deviations):

* **3-D mode** (`depths` given): V views (B, V, 3, S, S) -> `CLIPVisionModel`, hidden states of layer
  `vision_feature_layer` (-2), CLS dropped -> each patch back-projected to xyz (depth, intrinsics, pose,
  axis alignment) -> the 3-D position MLP (Linear 3->F, LayerNorm, ReLU, Linear F->F) added -> scatter-mean
  per 0.2 m voxel, voxels in lexicographic order, capped at `max_voxels` (seeded, sorted) -> the projector
  (Linear, GELU, Linear) -> spliced at the scene's placeholders (one per voxel, so rows differ in length).
* **2-D mode** (no `depths`): one image (B, 3, S, S) -> its (S/p)^2 patch features plus the position MLP of
  xyz = 0 times 0 (the authors' `encode_images`) -> projector -> spliced at that many placeholders.
* **Click prompt**: `clicks` (B, C, 3) [x, y, z] in the scene's axis-aligned frame -> the prompt encoder (the same
  MLP shape, 3 -> text hidden size) -> one token at each `click_token_id` placeholder (row b's placeholders take
  clicks[b, :n_b] in order).

`generate()` encodes the scene before the prefill (`get_image_features` takes pixel_values, depths,
intrinsics, poses and axis_align), so the decode steps never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
)

from vlm_prune.errors import InputError
from vlm_prune.models.llava3d.configuration import Llava3DConfig
from vlm_prune.models.llava3d.geometry import SceneGeometry, scatter_mean, scene_geometry


class PositionEmbeddingMLP(nn.Module):
    """The authors' learned 3-D position embedding: Linear(3, F), LayerNorm(F), ReLU, Linear(F, F).

    xyz: (..., 3) -> (..., F). Used for the scene patches (F = vision hidden size) and, as the prompt encoder,
    for clicks (F = text hidden size).
    """

    def __init__(self, out_features: int, in_features: int = 3):
        super().__init__()
        self.head = nn.Sequential(
            nn.Linear(in_features, out_features),
            nn.LayerNorm(out_features),
            nn.ReLU(),
            nn.Linear(out_features, out_features),
        )

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        return self.head(xyz)


class SceneVoxelizer(nn.Module):
    """No parameters: the geometry of every scene of a batch (a module so that its calls can be hooked).

    forward(depths (B, V, H, W), intrinsics (B, V, 4, 4) or (B, 4, 4), poses (B, V, 4, 4), axis_align (B, 4, 4),
    grid (h, w)) -> one `SceneGeometry` per scene. The 2-D mode calls it with depths=None (-> []), so a hook sees
    which mode every media encoding ran in.
    """

    def __init__(self, voxel_size: float, max_voxels: int, seed: int):
        super().__init__()
        self.voxel_size, self.max_voxels, self.seed = float(voxel_size), int(max_voxels), int(seed)

    def forward(self, depths, intrinsics, poses, axis_align, grid: tuple[int, int]) -> list[SceneGeometry]:
        settings = (self.voxel_size, self.max_voxels, self.seed)
        return scene_geometries(depths, intrinsics, poses, axis_align, grid, *settings)


def scene_geometries(depths, intrinsics, poses, axis_align, grid, voxel_size, max_voxels, seed) -> list[SceneGeometry]:
    """`scene_geometry` for every scene of a batch (shapes as `SceneVoxelizer.forward`); [] when depths is None."""
    if depths is None:
        return []
    depths = torch.as_tensor(depths)
    if depths.ndim != 4:
        raise InputError(f"depths must be (batch, views, H, W) in metres, got shape {tuple(depths.shape)}")
    batch = depths.shape[0]
    if axis_align is None:
        axis_align = torch.eye(4).expand(batch, 4, 4)
    axis_align = torch.as_tensor(axis_align, dtype=torch.float32)
    if axis_align.shape == (4, 4):
        axis_align = axis_align.expand(batch, 4, 4)
    for name, value in (("intrinsics", intrinsics), ("poses", poses), ("axis_align", axis_align)):
        if value is None or len(value) != batch:
            raise InputError(
                f"{name} must give one entry per scene of the batch ({batch}); pass the processor's outputs together"
            )
    return [
        scene_geometry(depths[b], intrinsics[b], poses[b], axis_align[b], grid, voxel_size, max_voxels, seed)
        for b in range(batch)
    ]


@dataclass
class Llava3DSceneOutput(BaseModelOutputWithPooling):
    """`get_image_features` output: pooler_output is the list of per-row (N_b, D) projected tokens.

    voxel_xyz / voxel_ijk: per scene (N_b, 3) voxel centres (metres) and integer voxel coordinates (3-D mode),
    or None (2-D mode).
    """

    voxel_xyz: list[torch.Tensor] | None = None
    voxel_ijk: list[torch.Tensor] | None = None


class Llava3DPreTrainedModel(PreTrainedModel):
    config: Llava3DConfig
    config_class = Llava3DConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class Llava3DModel(Llava3DPreTrainedModel):
    """Vision tower, 3-D position MLP, voxeliser, projector, prompt encoder and the Llama decoder."""

    def __init__(self, config: Llava3DConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.position_embedding = PositionEmbeddingMLP(config.vision_config.hidden_size)
        self.voxelizer = SceneVoxelizer(config.voxel_size, config.max_voxels, config.voxel_seed)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.prompt_encoder = PositionEmbeddingMLP(config.text_config.hidden_size)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def patch_grid(self) -> tuple[int, int]:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return side, side

    def _patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, F) CLIP patch features of layer `vision_feature_layer` (CLS dropped)."""
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        depths: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        poses: torch.Tensor | None = None,
        axis_align: torch.Tensor | None = None,
        **kwargs,
    ) -> Llava3DSceneOutput:
        """Projected scene (3-D mode) or image (2-D mode) tokens; see the module docstring.

        pixel_values: (B, V, 3, S, S) with depths (B, V, S, S) (metres, 0 = invalid), intrinsics and poses
        (B, V, 4, 4) and axis_align (B, 4, 4); or (B, 3, S, S) without depths (2-D mode, one image per row).
        """
        if depths is None:
            if pixel_values.ndim != 4:
                raise InputError(
                    f"2-D mode takes one image per row, pixel_values (B, 3, S, S); got {tuple(pixel_values.shape)}. "
                    "For a scene pass depths, intrinsics, poses and axis_align too (Llava3DProcessor returns them)"
                )
            self.voxelizer(None, None, None, None, self.patch_grid())  # marks the 2-D mode for hooks
            features = self._patch_features(pixel_values)
            zeros = features.new_zeros(*features.shape[:2], 3)
            features = features + self.position_embedding(zeros) * 0  # the authors' encode_images
            projected = self.multi_modal_projector(features.reshape(-1, features.shape[-1]))
            return Llava3DSceneOutput(pooler_output=list(projected.reshape(*features.shape[:2], -1)))
        if pixel_values.ndim != 5 or torch.as_tensor(depths).shape[:2] != pixel_values.shape[:2]:
            raise InputError(
                f"3-D mode takes pixel_values (B, V, 3, S, S) and depths (B, V, S, S) with the same B and V; got "
                f"{tuple(pixel_values.shape)} and {tuple(torch.as_tensor(depths).shape)}"
            )
        batch, views = pixel_values.shape[:2]
        geometries = self.voxelizer(depths, intrinsics, poses, axis_align, self.patch_grid())
        features = self._patch_features(pixel_values.flatten(0, 1))  # (B*V, P, F)
        features = features.reshape(batch, views * features.shape[1], -1)
        pooled = []
        for b, geometry in enumerate(geometries):
            rows = geometry.patch_voxel >= 0
            index = geometry.patch_index[rows].to(features.device)
            xyz = geometry.patch_xyz[rows].to(features.device, features.dtype)
            patches = features[b, index]
            if self.config.position_embedding_3d:
                patches = patches + self.position_embedding(xyz)
            voxels = scatter_mean(patches.float(), geometry.patch_voxel[rows].to(features.device), len(geometry))
            pooled.append(voxels.to(features.dtype))
        projected = self.multi_modal_projector(torch.cat(pooled))
        return Llava3DSceneOutput(
            pooler_output=list(torch.split(projected, [len(g) for g in geometries])),
            voxel_xyz=[g.voxel_xyz for g in geometries],
            voxel_ijk=[g.voxel_ijk for g in geometries],
        )

    def _splice_media(self, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.config.image_token_id
        found = int(mask.sum())
        if found != features.shape[0]:
            raise InputError(
                f"the prompt holds {found} scene/image placeholders but the media give {features.shape[0]} tokens; "
                "build input_ids and the media with the same Llava3DProcessor call (it emits one placeholder per "
                "voxel), and put the scene placeholder in every prompt that has a scene"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), features)

    def _splice_clicks(self, input_ids, inputs_embeds, clicks) -> torch.Tensor:
        mask = input_ids == self.config.click_token_id
        if not bool(mask.any()):
            return inputs_embeds
        if clicks is None:
            raise InputError("the prompt holds click placeholders but no clicks were passed; pass clicks (B, C, 3)")
        clicks = torch.as_tensor(clicks, dtype=torch.float32)
        if clicks.ndim == 2:
            clicks = clicks.unsqueeze(1)
        counts = mask.sum(dim=1).tolist()
        if clicks.ndim != 3 or clicks.shape[0] != input_ids.shape[0] or clicks.shape[-1] != 3 or (
            max(counts) > clicks.shape[1]
        ):
            raise InputError(
                f"clicks must be (batch, clicks per row, 3) with at least as many clicks per row as click placeholders "
                f"({max(counts)}); got {tuple(clicks.shape)} for a batch of {input_ids.shape[0]}"
            )
        picked = torch.cat([clicks[b, :n] for b, n in enumerate(counts)])
        dtype = inputs_embeds.dtype
        encoded = self.prompt_encoder(picked.to(inputs_embeds.device, self.prompt_encoder.head[0].weight.dtype))
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), encoded.to(dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        poses: torch.Tensor | None = None,
        axis_align: torch.Tensor | None = None,
        clicks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values, depths, intrinsics, poses, axis_align)
        encoded = mm_encoder_outputs.get("image")
        if input_ids is not None:
            if encoded is not None:
                features = torch.cat(list(encoded.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = self._splice_media(input_ids, inputs_embeds, features)
            elif (input_ids == self.config.image_token_id).any() and (cache is None or not cache.get_seq_length()):
                raise InputError(
                    "the prompt holds scene/image placeholders but no media were passed; pass the processor's "
                    "pixel_values (and depths, intrinsics, poses, axis_align for a scene)"
                )
            if clicks is not None or cache is None or not cache.get_seq_length():
                # decode steps get no clicks (see prepare_inputs_for_generation): a generated click token is text
                inputs_embeds = self._splice_clicks(input_ids, inputs_embeds, clicks)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return LlavaModelOutputWithPast(**outputs, image_outputs=encoded)


class Llava3DForConditionalGeneration(Llava3DPreTrainedModel, GenerationMixin):
    """LLaVA-3D with its language-model head; inputs as `Llava3DModel.forward` plus labels / logits_to_keep."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Llava3DConfig):
        super().__init__(config)
        self.model = Llava3DModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values, depths=None, intrinsics=None, poses=None, axis_align=None, **kwargs):
        return self.model.get_image_features(pixel_values, depths, intrinsics, poses, axis_align, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """As GenerationMixin's, but `clicks` describe the prompt's click placeholders only: they are passed to the
        first forward (prefill) and dropped on decode steps, where a generated click token stays a plain token."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("clicks", None)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
        intrinsics: torch.Tensor | None = None,
        poses: torch.Tensor | None = None,
        axis_align: torch.Tensor | None = None,
        clicks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            depths=depths,
            intrinsics=intrinsics,
            poses=poses,
            axis_align=axis_align,
            clicks=clicks,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs[0]
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            vocab = self.config.text_config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab, **kwargs)
        return LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = [
    "Llava3DForConditionalGeneration",
    "Llava3DModel",
    "Llava3DPreTrainedModel",
    "Llava3DSceneOutput",
    "PositionEmbeddingMLP",
    "SceneVoxelizer",
]

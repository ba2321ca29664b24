"""Adapter for LLaVA-3D (`vlm_prune.models.llava3d.Llava3DForConditionalGeneration`).

3-D mode: a row's scene placeholders are ONE media item of kind `SCENE`, one token per voxel in the model's
lexicographic voxel order. The layout carries every token's integer voxel coordinate (`layout.voxel`, also in
`grid_thw` as (i, j, k), so grid methods such as pool treat the scene as slices along i) and its voxel centre in
metres (`layout.xyz`); `media_grid` is the scene's voxel extent (I, J, K).

The voxels come from the geometry the model's `SceneVoxelizer` computed in the same call (recorded from its
forward pre-hook by re-running the same pure function, `scene_geometries`), so they never come from fixed
offsets; `generate()` expansion (beams, several sequences) maps each call row onto its recorded scene
(`expanded_item_index`). 2-D mode (no depths): one LLaVA-style image of (S/p)^2 patch tokens per row, kind IMAGE.

Signals: "projector" (the voxel features entering the projector, both modes) and "vision_attention" (CLIP's
CLS attention of the layer VisionZip reads; in 3-D mode a voxel gets the mean over its patches of the CLS
attention and of the keys, the same scatter-mean as its features).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, SampleMedia
from vlm_prune.adapters.expansion import expanded_item_index, row_totals
from vlm_prune.adapters.llava import LlavaAdapter, _grid_block, _layout_from_blocks
from vlm_prune.adapters.media_plan import HostMedia
from vlm_prune.engine.context import SCENE, VisualLayout
from vlm_prune.errors import InputError, PruneError


def scene_layout(voxel_ijk: torch.Tensor, voxel_xyz: torch.Tensor, media: int = 0) -> VisualLayout:
    """The layout of one scene's voxel tokens (ijk (K, 3) long, xyz (K, 3) float), as media item `media`."""
    count = len(voxel_ijk)
    index = torch.full((count,), media, dtype=torch.long)
    extent = (voxel_ijk.max(dim=0).values + 1).tolist() if count else [0, 0, 0]
    return VisualLayout(
        media_index=index,
        kind=torch.full_like(index, SCENE),
        frame=torch.zeros_like(index),
        grid_thw=voxel_ijk.long().cpu().clone(),
        media_grid=[tuple(int(v) for v in extent)],
        voxel=voxel_ijk.long().cpu().clone(),
        xyz=voxel_xyz.float().cpu().clone(),
    )


class Llava3DAdapter(LlavaAdapter):
    family = "llava3d"
    signals = frozenset({"projector", "vision_attention"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.click_token_id = int(model.config.click_token_id)

    def kind_token_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id, "scene": self.image_token_id}

    # ---- recordings
    def vision_module(self) -> nn.Module:
        return self.model.model.voxelizer

    def record_vision_call(self, args: tuple, kwargs: dict) -> object:
        from vlm_prune.models.llava3d.modeling import scene_geometries

        module = self.model.model.voxelizer
        names = ("depths", "intrinsics", "poses", "axis_align", "grid")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        if values.get("depths") is None:
            return []  # a 2-D encoding
        with torch.no_grad():
            return scene_geometries(
                values["depths"], values["intrinsics"], values["poses"], values.get("axis_align"), values["grid"],
                module.voxel_size, module.max_voxels, module.seed,
            )

    @staticmethod
    def _recorded(call: dict) -> list:
        return [r for r in call.get("vision_calls") or [] if isinstance(r, list)]

    def is_scene_call(self, call: dict) -> bool:
        """Whether the call's media are scenes (3-D mode) rather than 2-D images.

        From the call's own media when it carries them, else from the latest encoding the voxelizer saw
        (generate() encodes before the prefill; a chunk of generate(prefill_chunk_size=N) gets sliced features).
        """
        if call.get("pixel_values") is not None:
            return call.get("depths") is not None
        encoded = (call.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None and getattr(encoded, "voxel_ijk", None) is not None:
            return True
        recorded = self._recorded(call)
        return bool(recorded and recorded[-1])

    def _geometries(self, call: dict) -> list:
        recorded = self._recorded(call)
        if not recorded or not recorded[-1]:
            raise InputError(
                "llava3d: the scene's voxel geometry was not recorded in this call (were the scene features "
                "computed outside the model?); pass pixel_values with depths, intrinsics, poses and axis_align. "
                f"{SPLIT_MEDIA_HINT}"
            )
        return recorded[-1]

    # ---- media
    def sample_media(self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor) -> list[SampleMedia]:
        if not self.is_scene_call(call):
            return super().sample_media(input_ids, call, inputs_embeds)
        geometries = self._geometries(call)
        sizes = [len(g) for g in geometries]
        totals = row_totals(input_ids, self.image_token_id)
        try:
            items = iter(expanded_item_index(totals, sizes))
        except InputError as error:
            raise InputError(f"llava3d: {error}. {SPLIT_MEDIA_HINT}") from None
        samples = []
        for row, total in zip(input_ids, totals):
            columns = (row == self.image_token_id).nonzero(as_tuple=True)[0].cpu()
            if total == 0:
                samples.append(SampleMedia(columns, _layout_from_blocks([])))
                continue
            scene = next(items)
            if sizes[scene] != total:
                raise InputError(
                    f"llava3d: a row holds {total} scene placeholders but its scene has {sizes[scene]} voxels; put one "
                    "scene per prompt and build the prompt with Llava3DProcessor"
                )
            geometry = geometries[scene]
            samples.append(SampleMedia(columns, scene_layout(geometry.voxel_ijk, geometry.voxel_xyz)))
        return samples

    def image_blocks(
        self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor, host: HostMedia | None = None
    ) -> list[torch.Tensor]:
        """2-D mode: every image is one square patch grid (no CLS)."""
        side = self._grid_side()
        total = host.total if host is not None else int((input_ids == self.image_token_id).sum())
        if total % (side * side):
            raise InputError(
                f"llava3d 2-D mode: {total} image tokens are not whole images of {side * side}; pass the processor's "
                f"input_ids with its pixel_values. {SPLIT_MEDIA_HINT}"
            )
        return [_grid_block(0, side, side) for _ in range(total // (side * side))]

    # ---- signals
    def projector_rows(self, captured: list[torch.Tensor], call: dict) -> dict[str, torch.Tensor]:
        features = captured[-1]
        rows = features.reshape(-1, features.shape[-1])
        return {"scene": rows} if self.is_scene_call(call) else {"image": rows}

    def vision_attention_layer(self) -> nn.Module:
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature_layer = self.model.config.vision_feature_layer
        return layers[feature_layer if feature_layer < 0 else feature_layer - 1]

    def vision_attention_rows(self, recorded: list, call: dict):
        received, keys = recorded[-1]
        if not self.is_scene_call(call):
            return {"image": received.reshape(-1)}, {"image": keys.reshape(-1, keys.shape[-1])}
        from vlm_prune.models.llava3d.geometry import scatter_mean

        geometries = self._geometries(call)
        batch = len(geometries)
        received = received.reshape(batch, -1)
        keys = keys.reshape(batch, -1, keys.shape[-1])
        out_received, out_keys = [], []
        for b, geometry in enumerate(geometries):
            rows = geometry.patch_voxel >= 0
            patches = geometry.patch_index[rows].to(received.device)
            index = geometry.patch_voxel[rows].to(received.device)
            out_received.append(scatter_mean(received[b, patches].float()[:, None], index, len(geometry))[:, 0])
            out_keys.append(scatter_mean(keys[b, patches].float(), index, len(geometry)).to(keys.dtype))
        return {"scene": torch.cat(out_received)}, {"scene": torch.cat(out_keys)}

    def pixel_rows(self, recorded: list, call: dict) -> dict[str, torch.Tensor]:
        raise PruneError("llava3d: the 'pixels' signal is not available (a voxel pools patches of several views)")

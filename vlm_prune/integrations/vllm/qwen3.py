"""Qwen3-VL in the vLLM plugin: deepstack features and videos whose frames are separated by timestamp text.

`VlmPruneQwen3VLForConditionalGeneration` subclasses vLLM's `Qwen3VLForConditionalGeneration` (see `models.py` for
what every family's subclass changes). The two Qwen3-VL traps:

* **Deepstack.** vLLM's tower returns each token as one row [main | deepstack level 1 | ... | level L]; the LLM
  adds the levels at its first L layers. The selection sees the main features only (what the transformers path's
  `visual_features` are); the deepstack columns of the kept rows are carried along (the transformers adapter's
  `deepstack_visual_embeds[e][visual_keep]`), also for merged methods (pool).
* **Video.** A video of T temporal steps is T frames, each "<t.t seconds>" text, vision start, the frame's tokens,
  vision end, and positions restart at t = 0 per frame. Which frames keep how many tokens is known only after
  encoding, so the processor emits the frames' text with all k = `count(grid, spec)` video tokens in frame 0 (the
  placeholder layout vLLM's own EVS uses, `get_video_repl(tokens_per_frame=[k, 0, ...])`), the whole span as
  embeddings; the model returns one row per span token, in the real order (each frame's text, then its kept
  tokens), the text rows being the LLM's embeddings of those tokens (no deepstack). Each row carries its unpruned
  position (`positions.frames_layout`), so every token, text or media, sits where transformers puts it in the
  unpruned prompt. A video the spec does not prune takes the same path with all its tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_prune.adapters.base import ProjectorParts
from vlm_prune.integrations.vllm import compat
from vlm_prune.integrations.vllm.models import PruningMixin, _linear
from vlm_prune.integrations.vllm.positions import frames_layout, grid_layout, media_columns, prompt_positions
from vlm_prune.integrations.vllm.spec import count


def _video_ids(hw: int, frames: list[int], timestamps, tokenizer, config) -> list[int]:
    """The token ids of a video span whose frame f holds frames[f] video tokens (vLLM's own builder)."""
    repl = compat.load().qwen3_vl.Qwen3VLMultiModalProcessor.get_video_repl(
        tokens_per_frame=frames,
        timestamps=timestamps,
        tokenizer=tokenizer,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        video_token_id=config.video_token_id,
    )
    return list(repl.full)


def _processor_class() -> type:
    from vlm_prune.integrations.vllm.processor import _merge_size, _spec_of, pruning_processor

    vllm = compat.load()
    module = vllm.qwen3_vl

    class VlmPruneQwen3VLProcessor(pruning_processor(module.Qwen3VLMultiModalProcessor)):  # type: ignore[misc]
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            spec = _spec_of(self)
            updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
            if not spec.prunes("video") and self.info.ctx.get_mm_config().get_video_pruning_spec() is not None:
                return updates  # vLLM's EVS sizes the video (its own lumped layout)
            details = vllm.PromptUpdateDetails
            tokenizer = self.info.get_tokenizer()
            config = self.info.get_hf_config()
            merge = _merge_size(self)

            def video(item_idx: int):
                item = out_mm_kwargs["video"][item_idx]
                grid = item["video_grid_thw"].data.tolist()
                kept = count(grid, spec, "video", merge)
                frames = [kept] + [0] * (int(grid[0]) - 1)
                hw = grid[1] * grid[2] // merge // merge
                return details.from_seq(_video_ids(hw, frames, item["timestamps"].data, tokenizer, config))

            return [
                vllm.PromptReplacement(modality="video", target=u.target, replacement=video)
                if u.modality == "video" else u
                for u in updates
            ]

    VlmPruneQwen3VLProcessor.__name__ = VlmPruneQwen3VLProcessor.__qualname__ = "VlmPruneQwen3VLMultiModalProcessor"
    return VlmPruneQwen3VLProcessor


def qwen3_class() -> type:
    vllm = compat.load()
    module = vllm.qwen3_vl
    base = module.Qwen3VLForConditionalGeneration

    class VlmPruneQwen3VLForConditionalGeneration(PruningMixin, base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = "model"):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vlm_prune_init(vllm_config)

        def _projector_module(self) -> nn.Module:
            return self.visual.merger.linear_fc1

        def _merger_linears(self) -> tuple[nn.Module, nn.Module]:
            return self.visual.merger.linear_fc1, self.visual.merger.linear_fc2

        def _projector_parts(self) -> ProjectorParts:
            w1, b1, w2, b2 = self._vlm_prune_merger
            return ProjectorParts(w1, b1, nn.Sequential(self.visual.merger.act_fn, _linear(w2, b2)))

        def _split_main(self, embedding: torch.Tensor):
            return embedding[:, : self.visual_dim], embedding[:, self.visual_dim :]

        def _t_factors(self, modality: str, multimodal_input, count: int) -> list[float]:
            return [1.0] * count  # frames carry their time as text; positions restart at t = 0 per frame

        def _item_rows(self, modality, kept, keep_mask, grid, t_factor, multimodal_input, index):
            if modality != "video":
                return super()._item_rows(modality, kept, keep_mask, grid, t_factor, multimodal_input, index)
            t, h, w = grid
            config = self.config
            timestamps = multimodal_input.timestamps[index]
            full = _video_ids(h * w, [h * w] * t, timestamps, self._tokenizer, config)
            frames = keep_mask.view(t, h * w).sum(dim=1).tolist()
            ids = _video_ids(h * w, frames, timestamps, self._tokenizer, config)
            local, _ = frames_layout(full, (h, w), config.vision_start_token_id, config.vision_end_token_id)
            full_video = torch.tensor(full) == config.video_token_id
            video = torch.tensor(ids) == config.video_token_id
            coords = torch.empty(len(ids), 3, dtype=torch.long)
            coords[video] = local[full_video][keep_mask.cpu()]
            coords[~video] = local[~full_video]
            device = kept.device
            text = self.get_language_model().embed_input_ids(torch.tensor(ids, device=device)).to(kept.dtype)
            rows = torch.zeros(len(ids), kept.shape[1], dtype=kept.dtype, device=device)
            rows[:, : self.visual_dim] = text
            rows[video.to(device)] = kept
            lead = ids.index(config.vision_start_token_id) + 1
            return torch.cat([rows, media_columns(coords, lead, kept.dtype).to(device)], dim=1)

        def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list):
            config = self.config
            merge = config.vision_config.spatial_merge_size
            items = []
            for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
                offset, length = int(feature.mm_position.offset), int(feature.mm_position.length)
                _, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
                if feature.modality == "image":
                    local, extent = grid_layout((1, h // merge, w // merge))
                else:
                    span = list(input_tokens[offset : offset + length])
                    local, extent = frames_layout(
                        span, (h // merge, w // merge), config.vision_start_token_id, config.vision_end_token_id
                    )
                items.append((offset, length, local, extent))
            return prompt_positions(len(input_tokens), items)

    register = vllm.MULTIMODAL_REGISTRY.register_processor(
        _processor_class(), info=module.Qwen3VLProcessingInfo, dummy_inputs=module.Qwen3VLDummyInputsBuilder
    )
    return register(VlmPruneQwen3VLForConditionalGeneration)

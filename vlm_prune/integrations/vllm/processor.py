"""The multimodal processor of an opted-in model: `count(grid, spec)` placeholders per item, cache keyed on the spec.

`pruning_processor(base)` subclasses one of vLLM's processors (Qwen2.5-VL's, Qwen3-VL's) and overrides two methods:

* `_get_prompt_updates`: each `PromptReplacement` of vLLM's processor is kept (its target, its modality), and its
  replacement is wrapped: the original replacement gives the placeholder token, our `count` gives how many. Only
  plain token lists are resized; a structured replacement (Qwen3-VL video: timestamps and per-frame markers) is
  left alone here and sized by Qwen3-VL's own subclass (`qwen3.py`).
* `_get_mm_hashes`: every item hash is re-hashed with the spec's `cache_key()`, so the processor cache (which
  stores each item's prompt updates) and the encoder cache (keyed on the same hash) never serve an item
  processed under another pruning setting.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vlm_prune.errors import PruneError
from vlm_prune.integrations.vllm import compat
from vlm_prune.integrations.vllm.spec import PruneSpec, count, spec_from_config


def _spec_of(processor: Any) -> PruneSpec:
    spec = spec_from_config(processor.info.get_hf_config())
    if spec is None:
        raise PruneError(
            "this architecture is vlm_prune's and needs a 'vlm_prune' setting: pass --hf-overrides "
            '\'{"vlm_prune": {"method": "divprune", "keep": 64}, "architectures": [...]}\''
        )
    return spec


def _merge_size(processor: Any) -> int:
    return int(processor.info.get_hf_config().vision_config.spatial_merge_size)


@cache
def pruning_processor(base: type) -> type:
    """A subclass of vLLM processor class `base` that emits `count(grid, spec)` placeholders (one class per base)."""
    vllm = compat.load()

    class PruningProcessor(base):  # type: ignore[misc, valid-type]
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            spec = _spec_of(self)
            merge = _merge_size(self)
            updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
            resized = []
            for update in updates:
                modality = update.modality
                if not spec.prunes(modality) or not callable(update.replacement):
                    resized.append(update)
                    continue
                original = update.replacement

                def replacement(item_idx: int, _original=original, _modality=modality):
                    tokens = _original(item_idx)
                    if not isinstance(tokens, list) or len(set(tokens)) != 1:
                        return tokens  # a structured replacement (Qwen3-VL video): left as vLLM builds it
                    grid = out_mm_kwargs[_modality][item_idx][f"{_modality}_grid_thw"].data
                    return [tokens[0]] * count(grid.tolist(), spec, _modality, merge)

                resized.append(
                    vllm.PromptReplacement(modality=modality, target=update.target, replacement=replacement)
                )
            return resized

        def _get_mm_hashes(self, inputs):
            hashes = super()._get_mm_hashes(inputs)
            key = _spec_of(self).cache_key()
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
            return {
                modality: [
                    vllm.MultiModalHasher.hash_kwargs(algorithm, vlm_prune=key, item=item_hash)
                    for item_hash in item_hashes
                ]
                for modality, item_hashes in hashes.items()
            }

    PruningProcessor.__name__ = PruningProcessor.__qualname__ = f"VlmPrune{base.__name__}"
    return PruningProcessor

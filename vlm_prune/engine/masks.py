"""The 4-D attention mask the decoder layers get after an in-LLM stage changed the sequence.

transformers' `create_causal_mask` costs ~50-70 us of host time per call (argument preprocessing, packed-sequence
detection, cache size queries) even when it ends by returning None (SDPA's `is_causal` path for an unpadded
sequence). Its result is a pure function of the config, the query's shape / dtype / device, the layer's cached
length and the 2-D mask; for the unpadded case (no 2-D mask) the engine remembers per signature that the answer
was None and skips the call next time. Any other case is built by transformers, every time.
"""

from __future__ import annotations

import torch

from vlm_prune.engine.lru import SmallLRU


class StageMasks:
    """Builds (or skips) the 4-D masks of one handle; owns the per-signature memory of None answers."""

    def __init__(self, config) -> None:
        self.config = config
        self._none: SmallLRU[bool] = SmallLRU(64)  # signatures whose unpadded mask transformers left to is_causal

    def build(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        position_ids: torch.Tensor,
        layer_idx: int | None,
        plain: bool,
    ):
        """`create_causal_mask(...)` for the layers after an in-LLM stage (None = causal, no mask needed).

        hidden: (B, L, D) the stage's output; mask: (B, P + L) 2-D mask, ignored when `plain` (no padding slot,
        nothing cached before: transformers may then skip the mask); cache: the forward's cache or None.
        """
        key = None
        if plain:
            past = -1 if cache is None or layer_idx is None else cache.get_seq_length(layer_idx)
            key = (tuple(hidden.shape[:2]), hidden.dtype, hidden.device, past, layer_idx is None)
            if key in self._none:
                return None
        from transformers.masking_utils import create_causal_mask

        result = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None if plain else mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer_idx,
            allow_is_causal_skip=plain,
        )
        if key is not None and result is None:
            self._none.get(key, lambda: True)
        return result

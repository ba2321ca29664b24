"""The 4-D attention mask the decoder layers get after an in-LLM stage changed the sequence.

transformers' `create_causal_mask` costs ~50-70 us of host time per call (argument preprocessing, packed-sequence
detection, cache size queries) even when it ends by returning None (SDPA's `is_causal` path for an unpadded
sequence). Its result is a pure function of the config, the query's shape / dtype / device, the layer's cached
length and the 2-D mask; for the unpadded case (no 2-D mask) the engine remembers per signature that the answer
was None and skips the call next time.

A padded batch (ragged kept counts, or the caller's padding) needs the mask itself. Under `sdpa` and `eager` on a
plain dynamic cache (or none) that mask is exactly causal AND the 2-D padding mask, which `padded_causal_mask`
builds in two tensor ops, the causal block remembered per length (~4x less host time than transformers' generic
mask-function path; tested equal to `create_causal_mask` for both implementations, with and without cached
positions). Anything else (flash, flex, sliding-window or static caches, bidirectional configs) is built by
transformers, every time.
"""

from __future__ import annotations

import torch

from vlm_prune.engine.lru import SmallLRU

_PLAIN_IMPLEMENTATIONS = ("sdpa", "eager")


def _plain_layer(cache, layer_idx: int | None) -> bool:
    """Whether `cache` is None or its layer `layer_idx` is a plain full-attention `DynamicLayer` (its mask covers
    every cached position plus the query; no window, no static size)."""
    if cache is None:
        return True
    if layer_idx is None or not hasattr(cache, "layers") or layer_idx >= len(cache.layers):
        return False
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - every transformers 5.x has it
        return False
    return type(cache.layers[layer_idx]) is DynamicLayer


def causal_block(past: int, q_length: int, device: torch.device) -> torch.Tensor:
    """(Q, P + Q) bool: query q (at position P + q) may attend key k exactly when k <= P + q."""
    keys = torch.arange(past + q_length, device=device)
    return keys <= torch.arange(past, past + q_length, device=device).unsqueeze(1)


def padded_causal_mask(
    config, hidden: torch.Tensor, mask: torch.Tensor, cache, layer_idx: int | None, causal=causal_block
):
    """The 4-D mask `create_causal_mask` returns for a 2-D `mask` under sdpa (bool, True = attend) or eager (0 /
    dtype min), or None when this case is not the plain one (then ask transformers).

    hidden: (B, Q, D) the query slots; mask: (B, P + Q) 2-D, the P cached positions first (shorter: padded with 0,
    as transformers pads it); the cache's layer `layer_idx` holds P positions; causal: `causal_block` or a
    memo of it (`StageMasks`: read-only blocks). Returns (B, 1, Q, P + Q), a new tensor.
    """
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _PLAIN_IMPLEMENTATIONS or not getattr(config, "is_causal", True):
        return None
    if mask is None or mask.ndim != 2 or not _plain_layer(cache, layer_idx):
        return None
    q_length, device = hidden.shape[1], hidden.device
    past = 0 if cache is None else cache.get_seq_length(layer_idx)
    kv_length = past + q_length
    padding = mask.to(device=device, dtype=torch.bool)
    if padding.shape[1] < kv_length:
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[1]))
    allowed = causal(past, q_length, device) & padding[:, None, None, :kv_length]  # (B, 1, Q, KV)
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), device=device, dtype=hidden.dtype), torch.finfo(hidden.dtype).min)


class StageMasks:
    """Builds (or skips) the 4-D masks of one handle; owns the per-signature memory of None answers."""

    def __init__(self, config) -> None:
        self.config = config
        self._none: SmallLRU[bool] = SmallLRU(64)  # signatures whose unpadded mask transformers left to is_causal
        self._causal: SmallLRU[torch.Tensor] = SmallLRU(8)  # (P, Q, device) -> `causal_block`, when small

    def _causal_block(self, past: int, q_length: int, device: torch.device) -> torch.Tensor:
        """`causal_block`, remembered up to 2**20 entries a block (a prompt's length recurs; three ops saved)."""
        if q_length * (past + q_length) > 1 << 20:
            return causal_block(past, q_length, device)
        return self._causal.get((past, q_length, device), lambda: causal_block(past, q_length, device))

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
        else:
            fast = padded_causal_mask(self.config, hidden, mask, cache, layer_idx, self._causal_block)
            if fast is not None:
                return fast
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

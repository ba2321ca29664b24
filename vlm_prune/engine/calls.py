"""Small questions the engine's hooks ask of a call, kept cheap: they run in every forward (`engine/handle.py`).

* `cache_of`: the call's cache, checked once per cache object (type, no static or quantized layers);
* `brings_media`: whether the call carries media to encode or pre-encoded media features;
* `rope_view`: the rotary positions a decode step's `position_ids` stand for, as a view (no copy);
* `read_keeps`: a stage's keep masks (and merge groups) in ONE device->host copy;
* `segments_later`: a row's `segments_fn` whose host slice is taken only if a method asks.
"""

from __future__ import annotations

from functools import partial

import torch

from vlm_prune.engine.segments import segments_fn
from vlm_prune.errors import AttentionImplementationError

CHECKED = "_vlm_prune_checked_layers"  # a cache already checked, with this many layers


def cache_of(kwargs: dict):
    """The cache of a call's kwargs (`cache` or `past_key_values`), or None; raises for caches the engine cannot
    prune. The full check runs once per cache object and layer count (marked on the cache, `CHECKED`)."""
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None and getattr(cache, CHECKED, -1) == len(layers):
        return cache  # checked on an earlier call (every hook of every forward asks)
    if not hasattr(cache, "layers"):
        raise AttentionImplementationError(
            f"cache of type {type(cache).__name__} is not supported; use transformers' DynamicCache (the default)"
        )
    if cache is not None and type(cache).__name__ in ("StaticCache", "HybridCache", "OffloadedStaticCache"):
        raise AttentionImplementationError(
            "static caches cannot hold pruned sequences of varying length; generate with the default "
            "DynamicCache (do not set cache_implementation='static')"
        )
    if cache is not None and any("Quantized" in type(layer).__name__ for layer in cache.layers):
        raise AttentionImplementationError(
            "quantized KV caches are not supported yet (the engine trims and maps cached positions, which "
            "quantized layers store packed); generate with the default DynamicCache (do not set "
            "cache_implementation='quantized')"
        )
    if cache is not None:
        setattr(cache, CHECKED, len(cache.layers))
    return cache


def segments_later(adapter, ids: torch.Tensor, columns: torch.Tensor, row: int, where, media):
    """`segments_fn` for row `row` of the (B, L0) host `ids`, whose current columns (`columns[row, where]`, host)
    are sliced on first use."""
    return partial(_segments_of_row, adapter, ids, columns, row, where, media)


def _segments_of_row(adapter, ids: torch.Tensor, columns: torch.Tensor, row: int, where, media):
    return segments_fn(adapter, ids[row], columns[row, where], media)()


def rope_view(ids, rows: int, device) -> torch.Tensor | None:
    """`Adapter.rope_positions(ids)` as a view, without its copy (the engine never writes into it); None when
    `ids` need the adapter (no ids, another device or shape). (A call without ids: `engine/aranges.py`.)"""
    if not isinstance(ids, torch.Tensor) or ids.device != device:
        return None
    if ids.ndim == 2:  # (expand adds the leading axis: one view op)
        return ids.expand(rows, -1, -1)
    if ids.ndim == 3 and ids.shape[0] in (rows, rows + 1):
        return ids[ids.shape[0] - rows :]
    return None


def read_keeps(keeps: list[torch.Tensor], selections: dict, device) -> tuple[torch.Tensor, dict]:
    """The stage's keep masks (and merge groups), concatenated row-major, in ONE device->host copy.

    Returns (keep (P,) bool on the host, {row: (K_row,) long group labels on the host}).
    """
    if len(keeps) == 1:
        flat = keeps[0]
    else:
        flat = torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool, device=device)
    groups = [(row, torch.as_tensor(s.group).to(device).reshape(-1).long()) for row, s in selections.items()
              if s.group is not None]
    if not groups:
        return flat.cpu(), {}
    packed = torch.cat([flat.long()] + [group for _, group in groups]).cpu()
    parts = packed.split([len(flat)] + [len(group) for _, group in groups])
    return parts[0].bool(), {row: part for (row, _), part in zip(groups, parts[1:])}


def brings_media(call: dict) -> bool:
    """Whether the call carries media to encode or pre-encoded media features."""
    get = call.get
    values = (get("pixel_values"), get("pixel_values_videos"), get("mm_encoder_outputs"))
    if values[0] is None and values[1] is None and values[2] is None:  # (a decode step: one line)
        return False
    return any(value is not None and len(value) for value in values)

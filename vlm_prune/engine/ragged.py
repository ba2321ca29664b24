"""Ragged caches: after a prefill, groups of decoder layers may hold different token sets.

Each in-LLM stage starts a *segment*: (first layer, (B, L_seg) original columns of the slots those layers
cached, -1 = pad slot). Without re-entry every segment's columns contain the next one's, and trimming
(`trim_cache=True`) gathers every layer down to the final kept set, so decode is uniform. With re-entry
(LVLM_CSP's scatter) the layers before the re-entry hold only the representatives, which need not contain
the final set. Those layers are left as they are: decode reads each segment's own columns and the engine
maps the caller's 2-D mask (over the ORIGINAL sequence) per segment (`engine/continuation.py` builds one
causal mask per segment and hands it to that segment's layers).

What a layer holds after the prefill:

    trim_cache=False: every layer exactly what it computed (representatives < s1, all tokens s1..s2,
                      the final set from s2): decode equals a full recompute with the same selections.
    trim_cache=True:  every segment whose columns contain the final set is trimmed to it; the others
                      (layers < s1) keep their representatives.
"""

from __future__ import annotations

import numpy as np
import torch

from vlm_prune.engine.batch import SAME, to_device
from vlm_prune.kernels import trim_layers

Segments = list[tuple[int, torch.Tensor]]


def _slot_map(outer: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width + 1) long: the slot of `outer` (B, L_out) holding each original column, -1 where none does;
    column `width` stands for the pad slots."""
    slot_of = torch.full((outer.shape[0], width + 1), -1, dtype=torch.long, device=outer.device)
    rows, slots = (outer >= 0).nonzero(as_tuple=True)
    slot_of[rows, outer[rows, slots]] = slots
    return slot_of


def _width(*columns: torch.Tensor) -> int:
    return max((int(c.max()) for c in columns if c.numel()), default=0) + 1


def contains(outer: torch.Tensor, inner: torch.Tensor) -> bool:
    """Whether every real column (>= 0) of each row of `inner` (B, L_in) is in that row of `outer` (B, L_out).

    Batched (a few ops whatever B); on host tensors, as the engine calls it, it reads nothing from a device.
    """
    width = _width(outer, inner)
    found = _slot_map(outer, width).gather(1, inner.where(inner >= 0, width)) >= 0
    return bool((found | (inner < 0)).all())


def positions_within(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """For each slot of `inner` (B, L_in), its slot index in `outer` (B, L_out); -1 for pad slots.

    Both hold original columns (pad slots -1); inner's columns must be a subset. Batched, like `contains`.
    """
    width = _width(outer, inner)
    index = _slot_map(outer, width).gather(1, inner.where(inner >= 0, width))
    return index.where(inner >= 0, -1)


def _has_pads(index: torch.Tensor) -> bool:
    """Whether the host `index` holds a pad slot (-1): in numpy (three torch ops cost ~10x these two)."""
    if type(index) is torch.Tensor and index.is_cpu:
        return bool(np.count_nonzero(index.numpy() < 0))
    return bool((index < 0).any())


def trim_segments(
    cache,
    segments: Segments,
    final_columns: torch.Tensor,
    num_layers: int,
    host: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    within: list | None = None,
) -> Segments:
    """Trim the cache layers of every segment that contains the final set to it; return the new segments.

    Segments left untrimmed keep their own columns (the ragged case); consecutive segments with the same
    columns are merged, so a cache without re-entry ends as one segment `[(0, final_columns)]`.
    host: host copies of the segments' columns and of the final columns (the engine's mirrors): every decision
    and index is then computed on the host and only the index is sent to the device (no sync).
    within: per segment, the (host) slot within its slots of every final slot, as the engine composed it from the
    stages' compaction indices, its pad slots at slot 0 (`HostBatch.within_unread`: they are never read), `SAME`
    for the final segment, None where unknown (then it is found from the columns, as without `within`).
    """
    host_segments, host_final = host if host is not None else ([c for _, c in segments], final_columns)
    bounds = [layer for layer, _ in segments[1:]] + [num_layers]
    result: Segments = []
    previous = None
    within = within if within is not None and len(within) == len(segments) else [None] * len(segments)
    for (first, seg_columns), seg_host, end, known in zip(segments, host_segments, bounds, within):
        if known is SAME:
            seg_columns, seg_host = final_columns, host_final
        elif known is not None or contains(seg_host, host_final):
            if known is not None or seg_host.shape != host_final.shape or not torch.equal(seg_host, host_final):
                padded = False  # (`within`: pad slots already at slot 0)
                if known is None:
                    known = positions_within(seg_host, host_final)
                    padded = None if host is None else _has_pads(known)
                index = to_device(known, final_columns.device)
                # every layer's keys and values in one launch on CUDA (Triton), the torch reference elsewhere; the
                # pad slots are masked in every later call (their columns are -1), so they are not filled
                entries = [cache.layers[layer] for layer in range(first, end)]
                tensors = [e.keys for e in entries] + [e.values for e in entries]
                trimmed = trim_layers(tensors, index, padded=padded, unread_pads=True)
                for entry, keys, values in zip(entries, trimmed, trimmed[len(entries) :]):
                    entry.keys, entry.values = keys, values
            seg_columns, seg_host = final_columns, host_final
        if previous is not None and (previous is seg_host or (
            previous.shape == seg_host.shape and torch.equal(previous, seg_host)
        )):
            continue
        result.append((first, seg_columns))
        previous = seg_host
    return result

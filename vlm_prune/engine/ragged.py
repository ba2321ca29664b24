"""Ragged caches: after a prefill, groups of decoder layers may hold different token sets.

Each in-LLM stage starts a *segment*: (first layer, (B, L_seg) original columns of the slots those layers
cached, -1 = pad slot). Without re-entry every segment's columns contain the next one's, and trimming
(`trim_cache=True`) gathers every layer down to the final kept set, so decode is uniform. With re-entry
(LVLM_CSP's scatter) the layers before the re-entry hold only the representatives, which need not contain
the final set. Those layers are left as they are: decode reads each segment's own columns and the engine
maps the caller's 2-D mask (over the ORIGINAL sequence) per segment (`_continue` in `handle.py` builds one
causal mask per segment and hands it to that segment's layers).

What a layer holds after the prefill:

    trim_cache=False: every layer exactly what it computed (representatives < s1, all tokens s1..s2,
                      the final set from s2): decode equals a full recompute with the same selections.
    trim_cache=True:  every segment whose columns contain the final set is trimmed to it; the others
                      (layers < s1) keep their representatives.
"""

from __future__ import annotations

import torch

from vlm_prune.kernels import trim_layers

Segments = list[tuple[int, torch.Tensor]]


def contains(outer: torch.Tensor, inner: torch.Tensor) -> bool:
    """Whether every real column (>= 0) of each row of `inner` (B, L_in) is in that row of `outer` (B, L_out)."""
    return all(
        bool(torch.isin(inner_row[inner_row >= 0], outer_row[outer_row >= 0]).all())
        for outer_row, inner_row in zip(outer, inner)
    )


def positions_within(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """For each slot of `inner` (B, L_in), its slot index in `outer` (B, L_out); -1 for pad slots.

    Both hold original columns in ascending order (pad slots -1 first); inner's columns must be a subset.
    """
    index = torch.full_like(inner, -1)
    for row in range(inner.shape[0]):
        outer_row, inner_row = outer[row], inner[row]
        real = inner_row >= 0
        outer_real = (outer_row >= 0).nonzero(as_tuple=True)[0]
        positions = torch.searchsorted(outer_row[outer_real], inner_row[real])
        index[row, real] = outer_real[positions]
    return index


def trim_segments(cache, segments: Segments, final_columns: torch.Tensor, num_layers: int) -> Segments:
    """Trim the cache layers of every segment that contains the final set to it; return the new segments.

    Segments left untrimmed keep their own columns (the ragged case); consecutive segments with the same
    columns are merged, so a cache without re-entry ends as one segment `[(0, final_columns)]`.
    """
    bounds = [layer for layer, _ in segments[1:]] + [num_layers]
    result: Segments = []
    for (first, seg_columns), end in zip(segments, bounds):
        if contains(seg_columns, final_columns):
            if seg_columns.shape != final_columns.shape or not torch.equal(seg_columns, final_columns):
                index = positions_within(seg_columns, final_columns)
                # every layer's keys and values in one launch on CUDA (Triton), the torch reference elsewhere
                entries = [cache.layers[layer] for layer in range(first, end)]
                trimmed = trim_layers([e.keys for e in entries] + [e.values for e in entries], index)
                for entry, keys, values in zip(entries, trimmed, trimmed[len(entries) :]):
                    entry.keys, entry.values = keys, values
            seg_columns = final_columns
        previous = result[-1][1] if result else None
        if previous is not None and previous.shape == seg_columns.shape and torch.equal(previous, seg_columns):
            continue
        result.append((first, seg_columns))
    return result

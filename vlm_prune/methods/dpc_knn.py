"""DPC-kNN clustering (density peaks with k-nearest-neighbour density), as PruneVid and TCFormer use it.

Density peaks clustering (Rodriguez & Laio, Science 2014) with the kNN density of Du et al. (2016), in the
form PruneVid (arXiv 2412.16117) uses: features are compared by Euclidean distance / sqrt(C); a token's
density is exp(-mean squared distance to its k nearest tokens, itself included); delta is the distance to
the nearest token of higher density (the largest distance for the densest); the `num_clusters` tokens of
highest density * delta are the centres, and every token joins its nearest centre (a centre joins itself).
Ties in density are broken by a tiny seeded jitter (1e-6 * U[0, 1), as the reference code does unseeded).

Memory is O(n^2) in the group size n only; PruneVid calls it per frame / per segment group, never on the
whole video.
"""

from __future__ import annotations

import torch


def dpc_knn(
    features: torch.Tensor, num_clusters: int, k: int = 7, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster (n, C) features into `num_clusters` groups.

    Returns (labels (n,) long in [0, num_clusters), centres (num_clusters,) long token indices; centre c has
    label c). num_clusters is clamped to [1, n]; k to [1, n].
    """
    n, channels = features.shape
    num_clusters = max(1, min(int(num_clusters), n))
    x = features.float()
    distance = torch.cdist(x, x) / channels**0.5
    nearest = torch.topk(distance, k=max(1, min(int(k), n)), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    jitter = torch.rand(n, generator=generator, dtype=torch.float32)
    density = density + jitter.to(density.device) * 1e-6
    higher = density[None, :] > density[:, None]  # (i, j): j is denser than i
    largest = distance.max()
    delta = torch.where(higher, distance, largest).min(dim=-1).values
    centres = torch.topk(delta * density, k=num_clusters).indices
    labels = distance[centres].argmin(dim=0)
    labels[centres] = torch.arange(num_clusters, device=labels.device)
    return labels, centres


def cluster_means(features: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(n, C) features, (n,) labels -> (num_clusters, C) mean per label (0 for an empty label), in fp32+."""
    x = features if features.dtype == torch.float64 else features.float()
    sums = torch.zeros((num_clusters, x.shape[1]), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_clusters).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]


def contiguous_segments(labels: list[int]) -> list[int]:
    """Make a per-frame cluster labelling contiguous in time; returns the segment lengths in order.

    PruneVid's refinement (its `refine_clusters` + `segment_lengths`): every cluster keeps its longest run(s)
    of consecutive frames; its other runs, and every run of a cluster whose longest run is a single frame,
    are relabelled with the neighbouring label whose adjacent run is longer (the left one on a tie; label 0
    when there is no neighbour). Segments are then the maximal runs of equal labels.
    """
    n = len(labels)
    refined = list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for index in range(1, n + 1):
        if index == n or labels[index] != labels[start]:
            runs.setdefault(labels[start], []).append((start, index))
            start = index
    for spans in runs.values():
        longest = max(end - begin for begin, end in spans)
        for begin, end in spans:
            if longest == 1 or end - begin != longest:
                refined[begin:end] = [-1] * (end - begin)
    index = 0
    while index < n:
        if refined[index] != -1:
            index += 1
            continue
        begin = index
        while index < n and refined[index] == -1:
            index += 1
        left_label, left_length = _run_before(refined, begin)
        right_label, right_length = _run_after(refined, index)
        if left_length > right_length:
            label = left_label
        elif right_length > left_length:
            label = right_label
        else:
            label = left_label if left_label is not None else right_label
        refined[begin:index] = [0 if label is None else label] * (index - begin)
    lengths, start = [], 0
    for index in range(1, n + 1):
        if index == n or refined[index] != refined[start]:
            lengths.append(index - start)
            start = index
    return lengths


def _run_before(labels: list[int], begin: int) -> tuple[int | None, int]:
    if begin == 0:
        return None, 0
    label, index = labels[begin - 1], begin - 1
    while index >= 0 and labels[index] == label:
        index -= 1
    return label, begin - 1 - index


def _run_after(labels: list[int], end: int) -> tuple[int | None, int]:
    if end >= len(labels):
        return None, 0
    label, index = labels[end], end
    while index < len(labels) and labels[index] == label:
        index += 1
    return label, index - end

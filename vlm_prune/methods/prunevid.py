"""PruneVid: visual token pruning for video LLMs (Huang et al., arXiv 2412.16117; Visual-AI/PruneVid).

Two stages per video (images in the prompt are left to the budget, see below):

Pre-LLM merge (`merge_video`), on the projected tokens arranged (T, H, W, D) by their (t, h, w) coordinate:
1. Temporal segments: DPC-kNN (k = 7) clusters the T per-step mean features into int(T * segment_ratio)
   groups (segment_ratio = 0.25), made contiguous in time (`dpc_knn.contiguous_segments`).
2. Static / dynamic split inside each segment: a location is static when the mean pairwise cosine similarity
   of its token across the segment's steps exceeds tau (0.8); its tokens are averaged over time into one.
   A one-step segment has no pairs and is all dynamic (the reference divides 0 by 0 and compares NaN).
3. Spatial merge: the segment's static tokens, and each step's dynamic tokens, are DPC-kNN-clustered into
   int(n * cluster_ratio) cluster means (cluster_ratio = 0.5), only when n > 14.
Layer M (default 10), attention-guided pruning (`prune_groups`):
4. Score each visual token by the attention the text tokens after the last visual token pay to it in layer
   M - 1: max over heads, then max over those queries (rows recomputed from q/k by the engine).
5. Keep the top int(alpha * n) (alpha = 0.4, at least 1) of each segment's static group and of each step's
   dynamic group. The caches of layers < M are trimmed to the kept tokens (the engine's `trim_cache`).

Positions (our documented choice): a merged token takes the slot, and so the RoPE / M-RoPE position
(t, h, w), of its FIRST member in sequence order (the earliest step of its segment, the first location in
raster order), and carries the members' mean feature. Unmerged tokens keep their own positions. The
reference instead packs the merged tokens [static_0, dynamic_0, static_1, ...] and renumbers positions.

Budget: with `keep=None` (default) the counts are the method's own (data dependent), as in the paper. With
`keep=f` (or a count) the layer-M stage keeps exactly the engine's per-item budget instead, shared over the
item's groups in proportion to their sizes (largest remainder), so PruneVid can be compared at fixed token
counts; image items are then pruned by the same attention score.

Layer M: the scripts' default 10 (LLaVA-OneVision-7B, 28 layers). With `layer=None` a model with fewer than
20 decoder layers gets round(10 / 28 * num_layers) (at least 1) instead, so that the stage keeps the same
relative depth; pass `layer=` to choose.

Deviations from the reference code: batched (per sample, any batch) and seeded (the density jitter comes
from the engine's per-sample generator); no (T*H*W)^2 distance matrix: DPC-kNN runs on the T step means and
on one segment's or one step's tokens at a time, and layer M needs only the text queries' attention rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlm_prune.engine.context import VIDEO, Selection, SelectionContext
from vlm_prune.errors import MethodOptionError
from vlm_prune.methods.base import Method, Stage, topk_mask
from vlm_prune.methods.dpc_knn import contiguous_segments, dpc_knn
from vlm_prune.methods.evs import video_grid_order
from vlm_prune.methods.registry import register

PAPER_LAYER, PAPER_DEPTH = 10, 28


@dataclass
class VideoMerge:
    """The pre-LLM merge of one video, over its tokens in raster (t, h, w) order (n = T*H*W).

    keep_mask: (n,) bool, the representative (first member) of every merged token.
    features: (K, D) merged features of the kept tokens, in raster order of their representatives.
    group: (K,) long: segment s's static group is s, step t's dynamic group is num_segments + t.
    segments: the segment lengths in steps.
    output_of: (n,) long, for every raster token the kept token (0..K-1, raster order) it merges into.
    """

    keep_mask: torch.Tensor
    features: torch.Tensor
    group: torch.Tensor
    segments: list[int]
    output_of: torch.Tensor

    @property
    def members(self) -> list[torch.Tensor]:
        """Per kept token, the raster indices of the tokens it stands for (ascending, itself first)."""
        return [(self.output_of == i).nonzero(as_tuple=True)[0] for i in range(len(self.features))]


def static_locations(segment: torch.Tensor, tau: float) -> torch.Tensor:
    """(W, S, D) one segment's tokens (W steps, S locations) -> (S,) bool: mean pairwise cosine > tau."""
    steps = segment.shape[0]
    if steps < 2:
        return torch.zeros(segment.shape[1], dtype=torch.bool, device=segment.device)
    unit = F.normalize(segment.float(), dim=-1)
    pair_sum = torch.einsum("wsd,vsd->s", unit, unit)  # sum over all (w, v) pairs, self pairs included
    return (pair_sum - steps) / (steps * (steps - 1)) > tau


def _cluster_units(features: torch.Tensor, cluster_ratio: float, k: int, min_size: int, generator) -> torch.Tensor:
    """Spatial merge of one group of S units (S, D) -> (S,) output label per unit: the units themselves when
    S <= min_size, else their DPC-kNN cluster among int(S * cluster_ratio)."""
    count = features.shape[0]
    if count <= min_size:
        return torch.arange(count)
    labels, _ = dpc_knn(features, int(count * cluster_ratio), k=k, generator=generator)
    return labels.cpu()


def merge_video(
    grid_features: torch.Tensor,
    *,
    tau: float = 0.8,
    segment_ratio: float = 0.25,
    cluster_ratio: float = 0.5,
    k: int = 7,
    min_size: int = 14,
    generator: torch.Generator | None = None,
) -> VideoMerge:
    """PruneVid's pre-LLM merge of one video. grid_features: (T, H, W, D) projected tokens.

    Every raster token gets the output token it merges into (`output_of`); an output token's feature is the
    mean of its members (for a static unit, the mean over the segment's steps, so a cluster of static units
    averages the units' time means exactly as the reference's cluster mean of them) and it sits at its first
    member. Vectorised over tokens: no per-cluster Python loop.
    """
    steps, height, width, dim = grid_features.shape
    locations = height * width
    tokens = grid_features.reshape(steps, locations, dim)
    num_segments = int(steps * segment_ratio)
    if num_segments > 1:
        labels, _ = dpc_knn(tokens.float().mean(dim=1), num_segments, k=k, generator=generator)
        segments = contiguous_segments(labels.tolist())
    else:
        segments = [steps]
    output_of = torch.empty((steps, locations), dtype=torch.long)
    group_of_output: list[torch.Tensor] = []
    next_output, start = 0, 0
    for index, length in enumerate(segments):
        segment = tokens[start : start + length]
        static = static_locations(segment, tau).cpu()
        static_index, dynamic_index = static.nonzero(as_tuple=True)[0], (~static).nonzero(as_tuple=True)[0]
        if len(static_index):
            units = segment[:, static_index.to(segment.device)].float().mean(dim=0)
            unit_output = _cluster_units(units, cluster_ratio, k, min_size, generator)
            output_of[start : start + length, static_index] = next_output + unit_output
            outputs = int(unit_output.max()) + 1
            group_of_output.append(torch.full((outputs,), index, dtype=torch.long))
            next_output += outputs
        for step in range(start, start + length):
            if not len(dynamic_index):
                continue
            units = tokens[step, dynamic_index.to(tokens.device)].float()
            unit_output = _cluster_units(units, cluster_ratio, k, min_size, generator)
            output_of[step, dynamic_index] = next_output + unit_output
            outputs = int(unit_output.max()) + 1
            group_of_output.append(torch.full((outputs,), len(segments) + step, dtype=torch.long))
            next_output += outputs
        start += length
    output_of = output_of.reshape(-1)
    # DPC-kNN may leave a cluster label unused: renumber the outputs densely
    used, output_of = torch.unique(output_of, return_inverse=True)
    group_of_output = torch.cat(group_of_output)[used]
    count = len(used)
    raster = torch.arange(steps * locations)
    first = torch.full((count,), steps * locations, dtype=torch.long).scatter_reduce(0, output_of, raster, "amin")
    order = torch.argsort(first)  # output tokens in raster order of their first member
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count)
    flat = tokens.reshape(-1, dim)
    x = flat if flat.dtype == torch.float64 else flat.float()
    sums = torch.zeros((count, dim), dtype=x.dtype, device=x.device).index_add_(0, output_of.to(x.device), x)
    sizes = torch.bincount(output_of, minlength=count).to(x.device, x.dtype)
    features = (sums / sizes[:, None])[order.to(x.device)].to(grid_features.dtype)
    keep_mask = torch.zeros(steps * locations, dtype=torch.bool)
    keep_mask[first] = True
    return VideoMerge(keep_mask, features, group_of_output[order], segments, rank[output_of])


def share_budget(sizes: list[int], budget: int) -> list[int]:
    """Split `budget` over groups of `sizes` in proportion to the sizes (largest remainder; each <= its size)."""
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    exact = [budget * size / total for size in sizes]
    shares = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: budget - sum(shares)]:
        shares[i] += 1
    return shares


def prune_groups(scores: torch.Tensor, group: torch.Tensor, keep_per_group: dict[int, int]) -> torch.Tensor:
    """Top-`keep_per_group[g]` of `scores` (N,) within each group label of `group` (N,) -> (N,) bool."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for label, count in keep_per_group.items():
        members = (group == label).nonzero(as_tuple=True)[0]
        keep_mask[members[topk_mask(scores[members], count)]] = True
    return keep_mask


def text_attention_scores(attention: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """(H, Q, L) attention of the text queries -> (N,) max over heads, then over queries, at `visual_index`."""
    return attention[:, :, visual_index].float().amax(dim=0).amax(dim=0)


@dataclass
class PruneVid(Method):
    """PruneVid (arXiv 2412.16117): merge static and similar video tokens, then prune by text attention at M.

    keep: None (the method's own counts, the paper) or a budget the layer-M stage meets exactly.
    layer: M (None: 10, or the same relative depth on models with < 20 layers). alpha, tau, segment_ratio,
    cluster_ratio, k, min_merge: the reference script's defaults 0.4, 0.8, 0.25, 0.5, 7, 14.
    """

    keep: float | int | None = None
    layer: int | None = None
    alpha: float = 0.4
    tau: float = 0.8
    segment_ratio: float = 0.25
    cluster_ratio: float = 0.5
    k: int = 7
    min_merge: int = 14
    media = "video"
    name = "prunevid"
    _info: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for option in ("alpha", "cluster_ratio", "segment_ratio"):
            value = getattr(self, option)
            if not 0.0 < float(value) <= 1.0:
                raise MethodOptionError(f"PruneVid {option}={value}: it must be in (0, 1]")
        if not -1.0 <= float(self.tau) <= 1.0:
            raise MethodOptionError(f"PruneVid tau={self.tau}: a cosine threshold in [-1, 1] (default 0.8)")
        if self.layer is not None and int(self.layer) < 1:
            raise MethodOptionError(f"PruneVid prunes inside the LLM: layer must be >= 1, got {self.layer}")
        if int(self.k) < 1:
            raise MethodOptionError(f"PruneVid k={self.k}: the kNN size must be >= 1")

    def bind(self, info: Any) -> PruneVid:
        self._info = info
        return self

    def resolved_layer(self) -> int:
        if self.layer is not None:
            return int(self.layer)
        depth = getattr(self._info, "num_layers", None)
        if depth is None or depth >= 20:
            return PAPER_LAYER
        return max(1, round(PAPER_LAYER / PAPER_DEPTH * depth))

    def stages(self) -> list[Stage]:
        return [
            Stage(layer=0, select=self.merge, keep=None, name="prunevid-merge", counts_itself=True),
            Stage(
                layer=self.resolved_layer(),
                select=self.prune,
                keep=self.keep,
                needs=frozenset({"attention"}),
                name="prunevid-prune",
                counts_itself=self.keep is None,
            ),
        ]

    def merge(self, ctx: SelectionContext) -> Selection:
        """Stage 1 for one sample: every video item merged, image tokens kept as they are (group -1)."""
        layout = ctx.layout
        keep_mask = torch.ones(ctx.num_visual, dtype=torch.bool)
        features = ctx.visual_features.clone()
        group = torch.full((ctx.num_visual,), -1, dtype=torch.long)
        generator = ctx.generator()
        for item, grid in enumerate(layout.media_grid):
            members = ((layout.media_index == item) & (layout.kind == VIDEO)).nonzero(as_tuple=True)[0]
            if members.numel() == 0:
                continue
            raster = video_grid_order(layout.grid_thw[members], tuple(grid))
            arranged = torch.empty_like(ctx.visual_features[: members.numel()])
            arranged[raster.to(arranged.device)] = ctx.visual_features[members.to(arranged.device)]
            merged = merge_video(
                arranged.view(*grid, -1),
                tau=self.tau,
                segment_ratio=self.segment_ratio,
                cluster_ratio=self.cluster_ratio,
                k=self.k,
                min_size=self.min_merge,
                generator=generator,
            )
            # raster order -> this item's sequence order
            item_keep = merged.keep_mask[raster]
            slot_of_raster = torch.full((raster.numel(),), -1, dtype=torch.long)
            slot_of_raster[raster] = torch.arange(raster.numel())
            kept_sequence = slot_of_raster[merged.keep_mask.nonzero(as_tuple=True)[0]]  # raster order of kept
            keep_mask[members] = item_keep
            # features of the kept tokens, placed at their sequence slots
            target = members[kept_sequence]
            features[target.to(features.device)] = merged.features.to(features.device, features.dtype)
            group[target] = merged.group + 1_000 * item  # groups of different items never collide
        return Selection(keep_mask.to(ctx.visual_features.device), features[keep_mask.to(features.device)],
                         group[keep_mask])

    def prune(self, ctx: SelectionContext) -> torch.Tensor:
        """Stage 2 for one sample: top tokens by text attention, per group (alpha, or the shared budget)."""
        scores = text_attention_scores(ctx.attention_rows(ctx.text_index), ctx.visual_index).cpu()
        layout = ctx.layout
        group = layout.group if layout.group is not None else torch.full((ctx.num_visual,), -1, dtype=torch.long)
        # image tokens (group -1) form one group per media item
        group = torch.where(group >= 0, group, -1 - layout.media_index)
        keep_per_group: dict[int, int] = {}
        if ctx.budget_per_media is None:
            for label, size in zip(*torch.unique(group, return_counts=True)):
                keep_per_group[int(label)] = size.item() if label < 0 else max(1, int(self.alpha * size.item()))
        else:
            for item, budget in enumerate(ctx.budget_per_media):
                labels, sizes = torch.unique(group[layout.media_index == item], return_counts=True)
                for label, share in zip(labels.tolist(), share_budget(sizes.tolist(), budget)):
                    keep_per_group[label] = share
        return prune_groups(scores, group, keep_per_group).to(ctx.visual_features.device)


register("prunevid", PruneVid, "PruneVid (2412.16117): merge static/similar video tokens, prune by text attention.")

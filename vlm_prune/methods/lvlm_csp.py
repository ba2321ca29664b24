"""LVLM_CSP: clustering, scattering and pruning of visual tokens for reasoning segmentation (arXiv 2504.10854).

Three stages, in-LLM (the public record gives the stages, not the layers nor the scattering rule; ours are the
choices documented in `shared/METHODS.md`):

1. **Clustering** (pre-LLM, layers 0 .. s1): the projected visual tokens of each media item are grouped into
   N_c clusters (`cluster_method`: "kmeans" or "dpc_knn", both on cosine distance; ties go to the earlier
   token, i.e. spatial order); each cluster enters as one representative (`representative`: its "medoid", the
   member most similar to the cluster's mean direction, or the "mean" embedding at the medoid's position).
   `selector` = "random", "uniform" (evenly spaced in sequence order) or "vision_cls" (the vision tower's CLS
   attention) picks N_c representatives directly instead, and every other token joins its most similar one.
2. **Scattering** (layers s1 .. s2): every visual token re-enters, h_i(s1) = e_i + (h_rep(s1) - e_rep)
   (the engine's re-entry, `engine/reentry.py`).
3. **Pruning** (layers s2 .. end): keep the `keep` tokens that receive the most head-mean attention in layer
   s2 - 1 from the segmentation query: the last `[SEG]` token of the prompt (`query_token_id`), or the last
   prompt token when there is none.

Defaults, for a 32-layer LLM (ours): s1 = 2, s2 = 16, N_c = 25 %, keep = 10 %; for other depths s1 and s2 are
scaled to the depth (s1 >= 1, s1 < s2 < depth). `handle.stats.image_token_flops_reduction` reports the share of
image-token work removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlm_prune.engine.context import Selection, SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.base import Method, Stage, topk_mask_per_media
from vlm_prune.methods.dpc_knn import dpc_knn
from vlm_prune.methods.fastv import last_token_attention_scores
from vlm_prune.methods.registry import register

PAPER_DEPTH, PAPER_S1, PAPER_S2 = 32, 2, 16
CLUSTER_METHODS = ("kmeans", "dpc_knn")
REPRESENTATIVES = ("medoid", "mean")
SELECTORS = ("cluster", "random", "uniform", "vision_cls")


def cosine_kmeans(
    features: torch.Tensor, num_clusters: int, iterations: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Spherical k-means: (n, C) features -> (n,) labels in [0, num_clusters), every label used.

    Centres start at `num_clusters` distinct tokens drawn with `generator` and are the normalised member means
    after each assignment (argmax cosine; ties to the lower centre). A centre left empty is moved to the token
    least similar to its own centre, so every cluster is non-empty.
    """
    n = features.shape[0]
    num_clusters = max(1, min(int(num_clusters), n))
    x = F.normalize(features.float(), dim=-1)
    start = torch.randperm(n, generator=generator)[:num_clusters].sort().values.to(x.device)
    centres = x[start].clone()
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(max(1, int(iterations))):
        similarity = x @ centres.T  # (n, K)
        labels = similarity.argmax(dim=-1)
        labels = _fill_empty(labels, similarity, num_clusters)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = F.normalize(sums, dim=-1)
    return labels


def _fill_empty(labels: torch.Tensor, similarity: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Give every empty label the token least similar to its own centre (from clusters of >= 2 members)."""
    counts = torch.bincount(labels, minlength=num_clusters)
    if bool((counts > 0).all()):
        return labels  # the common case: one bincount, no Python loop
    labels = labels.clone()
    for label in (counts == 0).nonzero(as_tuple=True)[0].tolist():
        counts = torch.bincount(labels, minlength=num_clusters)
        own = similarity.gather(1, labels[:, None])[:, 0].clone()
        own[counts[labels] < 2] = float("inf")
        labels[int(own.argmin())] = label
    return labels


def medoids(features: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(K,) token index of each cluster's medoid: the member most similar (cosine) to its normalised mean."""
    x = F.normalize(features.float(), dim=-1)
    centres = F.normalize(torch.zeros(num_clusters, x.shape[1], device=x.device).index_add_(0, labels, x), dim=-1)
    similarity = (x * centres[labels]).sum(-1)
    best = torch.full((num_clusters,), -float("inf"), device=x.device)
    best = best.scatter_reduce(0, labels, similarity, reduce="amax")
    is_best = similarity >= best[labels]
    index = torch.arange(len(labels), device=x.device)
    candidate = torch.where(is_best, index, torch.full_like(index, len(labels)))
    out = torch.full((num_clusters,), len(labels), dtype=torch.long, device=x.device)
    return out.scatter_reduce(0, labels, candidate, reduce="amin")  # the earliest member on a tie


def nearest_labels(features: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(n,) label = index into `chosen` (K,) of the most similar chosen token (cosine); chosen tokens map to
    themselves."""
    x = F.normalize(features.float(), dim=-1)
    labels = (x @ x[chosen].T).argmax(dim=-1)
    labels[chosen] = torch.arange(len(chosen), device=labels.device)
    return labels


def scaled_layers(depth: int) -> tuple[int, int]:
    """(s1, s2) of the paper's 32-layer defaults (2, 16) scaled to `depth` layers, with 1 <= s1 < s2 < depth."""
    s1 = max(1, round(PAPER_S1 * depth / PAPER_DEPTH))
    s2 = max(s1 + 1, round(PAPER_S2 * depth / PAPER_DEPTH))
    if s2 >= depth:
        raise MethodOptionError(f"a {depth}-layer model leaves no room for LVLM_CSP's 3 stages (needs >= 3 layers)")
    return s1, s2


@dataclass
class LVLMCSP(Method):
    """LVLM_CSP: cluster to N_c representatives before the LLM, scatter all tokens back at s1, prune at s2.

    keep: tokens kept after s2 (fraction of each media item's tokens, default 0.1, or a count).
    clusters: N_c, representatives entering layers 0 .. s1 (fraction, default 0.25, or a count per item).
    s1, s2: the scatter and prune layers (None: the 32-layer defaults 2 and 16 scaled to the depth).
    cluster_method: "kmeans" or "dpc_knn"; representative: "medoid" or "mean"; selector: "cluster" (the
        clustering above), "random", "uniform" or "vision_cls".
    query_token_id: the `[SEG]` token id whose attention prunes (None or absent: the last prompt token).
    iterations: k-means iterations; knn: DPC-kNN's neighbourhood size.
    """

    keep: float | int | None = 0.1
    clusters: float | int = 0.25
    s1: int | None = None
    s2: int | None = None
    cluster_method: str = "kmeans"
    representative: str = "medoid"
    selector: str = "cluster"
    query_token_id: int | None = None
    iterations: int = 10
    knn: int = 5
    name = "lvlm_csp"

    def __post_init__(self) -> None:
        for option, value, allowed in (
            ("cluster_method", self.cluster_method, CLUSTER_METHODS),
            ("representative", self.representative, REPRESENTATIVES),
            ("selector", self.selector, SELECTORS),
        ):
            if value not in allowed:
                raise MethodOptionError(f"LVLM_CSP {option}={value!r}; choose one of {allowed}")
        if self.s1 is not None and self.s2 is not None:
            self._check_layers(int(self.s1), int(self.s2), None)
        self._info: Any = None

    def bind(self, info: Any) -> LVLMCSP:
        self._info = info
        return self

    @staticmethod
    def _check_layers(s1: int, s2: int, depth: int | None) -> None:
        if not 1 <= s1 < s2:
            raise MethodOptionError(f"LVLM_CSP needs 1 <= s1 < s2 (scatter before prune); got s1={s1}, s2={s2}")
        if depth is not None and s2 >= depth:
            raise MethodOptionError(f"LVLM_CSP s2={s2} must be below the model's {depth} decoder layers")

    def layers(self) -> tuple[int, int]:
        """(s1, s2) for the bound model (explicit values, else the scaled defaults)."""
        depth = getattr(self._info, "num_layers", None)
        default = scaled_layers(depth) if depth is not None else (PAPER_S1, PAPER_S2)
        s1 = int(self.s1) if self.s1 is not None else default[0]
        s2 = int(self.s2) if self.s2 is not None else max(default[1], s1 + 1)
        self._check_layers(s1, s2, depth)
        return s1, s2

    def stages(self) -> list[Stage]:
        s1, s2 = self.layers()
        cluster_needs = frozenset({"vision_attention"}) if self.selector == "vision_cls" else frozenset()
        return [
            Stage(layer=0, select=self.cluster, keep=self.clusters, needs=cluster_needs, name="lvlm_csp.cluster"),
            Stage(layer=s1, select=self.cluster, name="lvlm_csp.scatter", counts_itself=True, reenter=True),
            Stage(layer=s2, select=self.prune, keep=self.keep, needs=frozenset({"attention"}), name="lvlm_csp.prune"),
        ]

    # ---- stage 1: clustering
    def cluster(self, ctx: SelectionContext) -> Selection:
        """Representatives per media item: keep mask (N,), mean features if asked, and `represents` (N,)."""
        if ctx.budget_per_media is None:
            raise BudgetError("LVLM_CSP needs clusters=... (a fraction or a count per media item)")
        counts = torch.bincount(ctx.layout.media_index.cpu(), minlength=ctx.layout.num_media).tolist()
        if isinstance(self.clusters, int) and any(self.clusters > c for c in counts if c):
            raise BudgetError(
                f"LVLM_CSP clusters={self.clusters} is more than the {min(c for c in counts if c)} visual tokens "
                "of a media item; pass a smaller count or a fraction (e.g. clusters=0.25)"
            )
        device = ctx.visual_features.device
        keep_mask = torch.zeros(ctx.num_visual, dtype=torch.bool, device=device)
        represents = torch.arange(ctx.num_visual, device=device)
        features = ctx.visual_features.clone()
        generator = ctx.generator()
        for item, budget in enumerate(ctx.budget_per_media):
            members = (ctx.layout.media_index == item).nonzero(as_tuple=True)[0].to(device)
            if members.numel() == 0 or budget == 0:
                continue
            x = ctx.visual_features[members]
            labels, reps = self._group(ctx, members, x, budget, generator)
            keep_mask[members[reps]] = True
            represents[members] = members[reps[labels]]
            if self.representative == "mean":
                sums = torch.zeros(len(reps), x.shape[1], dtype=torch.float32, device=device)
                sums.index_add_(0, labels, x.float())
                sizes = torch.bincount(labels, minlength=len(reps)).clamp(min=1)
                features[members[reps]] = (sums / sizes[:, None]).to(features.dtype)
        return Selection(
            keep_mask=keep_mask,
            features=features[keep_mask] if self.representative == "mean" else None,
            represents=represents,
        )

    def _group(
        self, ctx: SelectionContext, members: torch.Tensor, x: torch.Tensor, budget: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels (n,) into reps, reps (K,) member indices, ascending) for one media item."""
        n = len(members)
        if self.selector == "cluster":
            if self.cluster_method == "kmeans":
                labels = cosine_kmeans(x, budget, self.iterations, generator)
            else:
                labels, _ = dpc_knn(F.normalize(x.float(), dim=-1), budget, k=self.knn, generator=generator)
            reps = medoids(x, labels, budget)
        else:
            if self.selector == "random":
                chosen = torch.randperm(n, generator=generator)[:budget]
            elif self.selector == "uniform":
                chosen = torch.linspace(0, n - 1, budget).round().long().unique()
            else:
                if ctx.vision_attention is None:
                    raise MethodOptionError("selector='vision_cls' needs the vision tower's CLS attention")
                chosen = torch.sort(ctx.vision_attention[members].float(), descending=True, stable=True).indices
                chosen = chosen[:budget]
            reps = chosen.to(x.device)
            labels = nearest_labels(x, reps)
        order = torch.argsort(reps)  # representatives in sequence order; relabel to match
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=order.device)
        return rank[labels], reps[order]

    # ---- stage 3: pruning
    def query_index(self, ctx: SelectionContext) -> int:
        """The last `[SEG]` token of the current sequence, or the last token when there is none."""
        if self.query_token_id is not None:
            found = (ctx.input_ids == int(self.query_token_id)).nonzero(as_tuple=True)[0]
            if found.numel():
                return int(found[-1])
        return ctx.last_index

    def prune(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.budget_per_media is None:
            raise BudgetError("LVLM_CSP needs a final budget: pass keep=... to apply()")
        rows = ctx.attention_rows(self.query_index(ctx))
        scores = last_token_attention_scores(rows, ctx.visual_index.to(rows.device))
        media_index = ctx.layout.media_index
        return topk_mask_per_media(scores.to(media_index.device), media_index, ctx.budget_per_media)


register(
    "lvlm_csp",
    LVLMCSP,
    "LVLM_CSP (2504.10854): cluster to 25 % before the LLM, scatter all tokens back at s1, prune to 10 % by the "
    "[SEG] query's attention at s2.",
)

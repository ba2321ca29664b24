"""CATP: contextually adaptive token pruning for multimodal in-context learning (Li et al., arXiv 2508.07871).

For interleaved few-shot prompts: n demonstrations (image + its text), then the query (image + question). R is the
share of image tokens removed overall; half of it (R/2) goes in stage 1, the rest in stage 2 / 2'.

Stage 1, pre-LLM, per image i (demonstrations and query alike), on its projected tokens X_i:
    select Y_i, |Y_i| = floor(S_i (1 - R/2)), maximising F_div(Y) + lambda1 * F_align(Y), with
    F_div(Y) = sum_{x in X_i} max_{y in Y} sim(y, x) (facility location), F_align(Y) = sum_{y in Y} sim(y, v_i),
    sim = (cos + 1) / 2 and v_i the mean embedding of the image's paired text (`ctx.segments`: the text between
    the image and the next one; for the query, its question). Solved by lazy greedy (`lazy_greedy`), which picks
    exactly what plain greedy (`plain_greedy`) picks, ties to the earlier token in both.
Stage 2, on the input of decoder layer K, over all demonstration-image tokens pooled:
    S(c) = max(0, A_K[q, c] - A_{K-1}[q, c]) + lambda2 * cos(h_c, q_mean). A is the head-mean attention row of the
    last token q, of layers K-1 and K, recomputed from q/k (`ctx.attention_rows(q, layer=...)`: layer K's row is
    what layer K would attend to over the stage-1 survivors); q_mean is the mean hidden state of the query sample
    (the query image's tokens and its paired text). The lowest are pruned GLOBALLY until the demonstration images
    hold sum_i floor(S_i (1 - R)) tokens, so per-demonstration budgets adapt. The query image is untouched.
Stage 2', on the input of decoder layer K + 1 (the output of layer K):
    v_c = the mean hidden state of the retained context (the demonstrations' surviving image tokens and their
    paired texts); the query image's tokens are scored by cos(h, v_c) and the top floor(S_q (1 - R)) kept.

Defaults: K = 6 for 32-layer (7-8B) models and 10 for 40-layer (13B) ones, as the paper; other depths get
round(6 / 32 * depth) (at least 1; 4-layer toys: K = 1, a 12-layer model: K = 2); lambda1 = 0.7, lambda2 = 0.6;
R = 77.8 % (`keep` = 1 - R; pass keep=0.333 / 0.222 / 0.111 for the paper's R = 66.7 / 77.8 / 88.9 %). Counts are
floor(S_i * fraction), at least 1 per image in stage 1 (the engine's `keep` rounds half up; CATP counts itself).

Deviations: batched (per sample; rows may hold different numbers of demonstrations), and the query may be any media
item (`query=`, Python indexing; default the last). Written from the paper's description in METHODS.md; the
authors' code was not consulted.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlm_prune.engine.context import SelectionContext
from vlm_prune.errors import InputError, MethodOptionError
from vlm_prune.methods.base import Method, Stage, topk_mask
from vlm_prune.methods.registry import register

PAPER_LAYERS = {32: 6, 40: 10}  # decoder depth -> K in the paper (7-8B, 13B)
DEFAULT_RATIO = 0.778
SINGLE_IMAGE_HINT = (
    "CATP prunes few-shot prompts (demonstration images, then the query image) and this prompt holds {count} "
    "image(s); for a single-image prompt use an image method such as 'divprune', 'fastv', 'zoo' or 'visionzip' "
    "(see vlm_prune.methods())"
)


# ------------------------------------------------------------------------------------------------ stage 1
def unit_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 between the rows of a (n, D) and b (m, D) -> (n, m) float64 in [0, 1]."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return (a @ b.T + 1.0) / 2.0


def _gains(similarity: np.ndarray, covered: np.ndarray, bonus: np.ndarray, rows) -> np.ndarray:
    """Marginal gains of the candidates `rows`: sum_x max(0, sim(y, x) - covered(x)) + bonus(y)."""
    return np.maximum(similarity[rows] - covered, 0.0).sum(axis=-1) + bonus[rows]


def plain_greedy(similarity: torch.Tensor, bonus: torch.Tensor, k: int) -> list[int]:
    """Greedy maximisation of sum_x max_{y in Y} sim(y, x) + sum_{y in Y} bonus(y), |Y| = k.

    similarity: (n, n) sim(y, x) in [0, 1]; bonus: (n,) lambda1 * sim(y, v). Every step evaluates every candidate and
    takes the largest gain (ties: the lowest index). Returns the chosen indices in the order they were chosen.
    """
    sim, extra = similarity.detach().double().cpu().numpy(), bonus.detach().double().cpu().numpy()
    n = sim.shape[0]
    covered = np.zeros(n)
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    for _ in range(min(int(k), n)):
        gains = _gains(sim, covered, extra, slice(None))
        gains[~available] = -np.inf
        best = int(np.argmax(gains))  # first maximum: the lowest index among ties
        chosen.append(best)
        available[best] = False
        covered = np.maximum(covered, sim[best])
    return chosen


def lazy_greedy(similarity: torch.Tensor, bonus: torch.Tensor, k: int, refresh: int = 4) -> list[int]:
    """The same choice as `plain_greedy`, by lazy evaluation (Minoux's accelerated greedy).

    Gains only shrink as Y grows (the objective is submodular), so a stale gain is an upper bound. Candidates sit in
    a heap by (-bound, index). When the top entry's bound is fresh (computed against the current Y) it is the
    largest true gain, the lowest index among equal ones: exactly plain greedy's pick. Otherwise the `refresh` top
    entries get their gains recomputed at once (one vectorised step) and go back into the heap.
    """
    sim, extra = similarity.detach().double().cpu().numpy(), bonus.detach().double().cpu().numpy()
    n = sim.shape[0]
    covered = np.zeros(n)
    heap = [(-float(gain), index) for index, gain in enumerate(_gains(sim, covered, extra, slice(None)))]
    heapq.heapify(heap)
    fresh = np.ones(n, dtype=bool)  # the entry's bound was computed against the current `covered`
    chosen: list[int] = []
    while heap and len(chosen) < min(int(k), n):
        if fresh[heap[0][1]]:
            _, index = heapq.heappop(heap)
            chosen.append(index)
            covered = np.maximum(covered, sim[index])
            fresh[:] = False
            continue
        top = [heapq.heappop(heap)[1] for _ in range(min(refresh, len(heap)))]
        for gain, index in zip(_gains(sim, covered, extra, top).tolist(), top):
            heapq.heappush(heap, (-gain, index))
            fresh[index] = True
    return chosen


def diverse_aligned(features: torch.Tensor, text_mean: torch.Tensor | None, k: int, lambda1: float) -> torch.Tensor:
    """Stage 1 for one image: features (n, D), text_mean (D,) or None -> (n,) bool mask of the k chosen tokens."""
    similarity = unit_similarity(features, features)
    if text_mean is None:
        bonus = torch.zeros(features.shape[0], dtype=torch.float64)
    else:
        bonus = lambda1 * unit_similarity(features, text_mean[None])[:, 0]
    keep_mask = torch.zeros(features.shape[0], dtype=torch.bool)
    keep_mask[lazy_greedy(similarity, bonus, k)] = True
    return keep_mask


# ------------------------------------------------------------------------------------------------ stage 2
def attention_gain(rows_previous: torch.Tensor, rows_current: torch.Tensor) -> torch.Tensor:
    """dA = max(0, A_K - A_{K-1}) of one query row: rows (H, 1, L) of layers K-1 and K -> (L,) float32."""
    return (rows_current[:, 0].float().mean(0) - rows_previous[:, 0].float().mean(0)).clamp(min=0.0)


def context_scores(delta: torch.Tensor, features: torch.Tensor, query_mean: torch.Tensor, lambda2: float):
    """S(c) = dA(c) + lambda2 * cos(h_c, q_mean): delta (n,), features (n, D), query_mean (D,) -> (n,) float32."""
    cosine = F.cosine_similarity(features.float(), query_mean.float()[None], dim=-1)
    return delta.float() + lambda2 * cosine


@dataclass
class CATP(Method):
    """CATP (arXiv 2508.07871) for few-shot prompts: see the module docstring.

    keep: the share of image tokens kept overall, 1 - R (a fraction in (0, 1); None: `ratio`). ratio: R, used when
    keep is None (default 0.778). layer: K (None: scaled by depth). lambda1, lambda2: 0.7, 0.6. query: the media
    item that is the query (Python indexing, default -1 = the last).
    """

    keep: float | int | None = None
    ratio: float = DEFAULT_RATIO
    layer: int | None = None
    lambda1: float = 0.7
    lambda2: float = 0.6
    query: int = -1
    name = "catp"

    def __post_init__(self) -> None:
        if self.layer is not None and int(self.layer) < 1:
            raise MethodOptionError(f"CATP's stage 2 runs inside the LLM: layer K must be >= 1, got {self.layer}")
        self._depth: int | None = None

    def bind(self, info) -> CATP:
        self._depth = getattr(info, "num_layers", None)
        return self

    # ---- configuration
    def removed_ratio(self) -> float:
        """R, checked to lie in (0, 1)."""
        if self.keep is not None:
            if isinstance(self.keep, int) and not isinstance(self.keep, bool):
                raise MethodOptionError(
                    f"CATP's budget is a ratio of each image's tokens, not a count; got keep={self.keep}: pass a "
                    "fraction, e.g. keep=0.222 (R = 77.8 %)"
                )
            ratio = 1.0 - float(self.keep)
        else:
            ratio = float(self.ratio)
        if not 0.0 < ratio < 1.0:
            raise MethodOptionError(
                f"CATP removes a share R in (0, 1) of the image tokens; got R = {ratio:.4g} "
                f"(keep = 1 - R): pass e.g. keep=0.222 or ratio=0.778"
            )
        return ratio

    def resolved_layer(self) -> int:
        if self.layer is not None:
            return int(self.layer)
        depth = self._depth
        if depth is None:
            return PAPER_LAYERS[32]
        return PAPER_LAYERS.get(depth, max(1, round(PAPER_LAYERS[32] / 32 * depth)))

    def stages(self) -> list[Stage]:
        self.removed_ratio()
        k = self.resolved_layer()
        if self._depth is not None and k + 1 >= self._depth:
            raise MethodOptionError(
                f"CATP prunes at layers K={k} and K+1={k + 1}, but the model has {self._depth} decoder layers; "
                f"pass layer= at most {self._depth - 2}"
            )
        return [
            Stage(layer=0, select=self.select_diverse, name="catp-diverse", counts_itself=True),
            Stage(
                layer=k,
                select=self.select_context,
                needs=frozenset({"attention"}),
                name="catp-context",
                counts_itself=True,
            ),
            Stage(layer=k + 1, select=self.select_query, name="catp-query", counts_itself=True),
        ]

    def _segments(self, ctx: SelectionContext):
        segments = ctx.segments.with_query(self.query)
        if segments.num_media < 2:
            raise InputError(SINGLE_IMAGE_HINT.format(count=segments.num_media))
        return segments

    @staticmethod
    def _count(original: int, fraction: float, at_least: int = 0) -> int:
        return max(at_least, math.floor(original * fraction + 1e-9))

    # ---- stage 1
    def select_diverse(self, ctx: SelectionContext) -> torch.Tensor:
        """Per image: facility location + lambda1 * alignment with its paired text, by lazy greedy."""
        segments = self._segments(ctx)
        ratio = self.removed_ratio()
        keep_mask = torch.zeros(ctx.num_visual, dtype=torch.bool)
        media_index = ctx.layout.media_index.cpu()
        for item in range(segments.num_media):
            members = (media_index == item).nonzero(as_tuple=True)[0]
            if members.numel() == 0:
                continue
            budget = self._count(segments.original_counts[item], 1.0 - ratio / 2, at_least=1)
            text = segments.text_index(item)
            text_mean = ctx.hidden_states[text.to(ctx.hidden_states.device)].mean(0).cpu() if len(text) else None
            features = ctx.visual_features[members.to(ctx.visual_features.device)].cpu()
            keep_mask[members] = diverse_aligned(features, text_mean, min(budget, members.numel()), self.lambda1)
        return keep_mask.to(ctx.visual_features.device)

    # ---- stage 2
    def select_context(self, ctx: SelectionContext) -> torch.Tensor:
        """Demonstration tokens pooled: dA + lambda2 cos(h, query mean), pruned globally; the query kept."""
        segments = self._segments(ctx)
        ratio = self.removed_ratio()
        device = ctx.visual_features.device
        media_index = ctx.layout.media_index.to(device)
        is_query = media_index == segments.query_media
        keep_mask = is_query.clone()
        demos = (~is_query).nonzero(as_tuple=True)[0]
        if demos.numel() == 0:
            return keep_mask
        budget = sum(self._count(segments.original_counts[i], 1.0 - ratio) for i in segments.demonstration_media)
        last = ctx.last_index
        delta = attention_gain(ctx.attention_rows(last, layer=ctx.layer - 1), ctx.attention_rows(last, layer=ctx.layer))
        query_positions = torch.cat(
            [ctx.visual_index[is_query], segments.query_text_index.to(ctx.visual_index.device)]
        )
        query_mean = ctx.hidden_states[query_positions].float().mean(0)
        scores = context_scores(delta[ctx.visual_index[demos]], ctx.visual_features[demos], query_mean, self.lambda2)
        keep_mask[demos[topk_mask(scores, min(budget, demos.numel()))]] = True
        return keep_mask

    # ---- stage 2'
    def select_query(self, ctx: SelectionContext) -> torch.Tensor:
        """The query image by cos(h, mean hidden state of the retained context); the demonstrations kept."""
        segments = self._segments(ctx)
        ratio = self.removed_ratio()
        device = ctx.visual_features.device
        media_index = ctx.layout.media_index.to(device)
        is_query = media_index == segments.query_media
        keep_mask = ~is_query
        query = is_query.nonzero(as_tuple=True)[0]
        if query.numel() == 0:
            return keep_mask
        text = [segments.text_index(i) for i in segments.demonstration_media]
        context = torch.cat([ctx.visual_index[~is_query], *[t.to(ctx.visual_index.device) for t in text]])
        if context.numel() == 0:  # every demonstration token pruned and no text: nothing to compare with
            context = ctx.visual_index[~is_query]
        context_mean = ctx.hidden_states[context].float().mean(0)
        cosine = F.cosine_similarity(ctx.visual_features[query].float(), context_mean[None], dim=-1)
        budget = self._count(segments.original_counts[segments.query_media], 1.0 - ratio)
        keep_mask[query[topk_mask(cosine, min(budget, query.numel()))]] = True
        return keep_mask


register(
    "catp",
    CATP,
    "CATP (2508.07871) for few-shot prompts: per-image diversity + text alignment, then demonstrations pruned "
    "globally by attention gain at K and the query at K+1.",
)

"""Base classes of methods: one per shape (scorer, selector, merger), as in kvpress's presses.

A method is a small object with its hyperparameters as dataclass fields. It declares where it runs
(`layer`, or several `stages()`) and which signals it needs (`needs`), and for one sample returns a
keep mask over that sample's visual tokens (or a `Selection` with merged features).

The public minimal contract (DESIGN.md): a subclass sets `layer: int` and implements
`select(self, ctx) -> torch.BoolTensor` of length `ctx.num_visual`. `keep` is optional.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlm_prune.engine.context import BatchSelectionContext, Selection, SelectionContext
from vlm_prune.errors import BudgetError, PruneError

SelectFn = Callable[[SelectionContext], "torch.Tensor | Selection"]
#: the whole batch's selection at once: (B, N_max) bool keep mask (pad entries False), or None for "per row"
SelectBatchFn = Callable[[BatchSelectionContext], "torch.Tensor | None"]

#: Signals a stage may ask the engine to record.
KNOWN_NEEDS = frozenset({"attention", "projector", "vision_attention", "pixels"})


@dataclass
class Stage:
    """One place where a method prunes.

    layer: 0 = pre-LLM (after the projector), k = on the input of decoder layer k.
    select: the function called per sample.
    keep: the budget AFTER this stage, as a fraction of the ORIGINAL visual tokens of each media item
        (float in (0, 1]) or a count per media item (int). None = the method's mask decides.
    needs: signals to record for this stage (subset of `KNOWN_NEEDS`).
    name: shown in `handle.stats`.
    counts_itself: the stage decides how many tokens it keeps (EVS's count from the grid and rate,
        PruneVid's data-dependent merge), so `keep=None` is its budget even for a named method.
    reenter: the stage brings back every token an earlier stage dropped with `Selection.represents`
        (LVLM_CSP's scatter; `engine/reentry.py`); `select` is not called.
    select_batch: the same selection for every row of the batch at once (`ScorerMethod.batch_select`), or None.
        The engine calls it instead of `select` when the batch allows (`engine/batch_select.py`); a None result
        sends the stage to `select`, row by row.
    """

    layer: int
    select: SelectFn
    keep: float | int | None = None
    needs: frozenset[str] = field(default_factory=frozenset)
    name: str = ""
    counts_itself: bool = False
    reenter: bool = False
    select_batch: SelectBatchFn | None = None


class Method:
    """Base class of every pruning method, built-in or user-defined.

    Class attributes a subclass may set:
        layer: where the single stage runs (0 = pre-LLM).
        needs: signals it wants (see `KNOWN_NEEDS`).
        media: "any", "image" or "video": what it can prune.
    Instance attribute:
        keep: the budget (fraction in (0, 1] or count per media item), set by `apply()` when None.
    """

    layer: int = 0
    needs: frozenset[str] = frozenset()
    media: str = "any"
    name: str = ""
    keep: float | int | None = None

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        raise NotImplementedError(f"{type(self).__name__} must implement select(ctx) or stages()")

    def stages(self) -> list[Stage]:
        """The stages of this method, in layer order. Default: one stage at `self.layer`."""
        return [
            Stage(
                layer=int(self.layer),
                select=self.select,
                keep=self.keep,
                needs=frozenset(self.needs),
                name=self.name or type(self).__name__,
                select_batch=self.batch_select(),
            )
        ]

    def batch_select(self) -> SelectBatchFn | None:
        """The method's selection of a whole batch at once, or None (the default: the engine calls `select` per
        row). `ScorerMethod` gives one when the subclass scores a batch (`score_batch`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep!r})"


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) scores -> (N,) bool mask of the k highest; ties go to the earlier token (stable)."""
    n = scores.numel()
    k = max(0, min(int(k), n))
    keep_mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep_mask
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    keep_mask[order[:k]] = True
    return keep_mask


def topk_mask_batched(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """`topk_mask_per_media` of every row at once, the same masks.

    scores: (B, N) float; groups: (B, N) long, each token's media item, -1 for pad entries (never kept);
    budgets: (B, M) long, tokens to keep per item (M > every group id). Returns (B, N) bool: in each (row, item)
    the budget's highest scores, ties to the earlier token (stable), as `topk_mask` of the item alone.

    Two stable sorts instead of one per item: by score (descending), then by item, so that every item's tokens
    come out in its own top-k order (a stable sort of a subset is the subset of the stable sort); a token's
    rank in its item is its place in that order less the item's start, and it is kept when the rank is under
    the item's budget. One chain of ~10 ops for the batch, against ~5 per item and row.
    """
    batch, n = scores.shape
    if n == 0:
        return torch.zeros(batch, 0, dtype=torch.bool, device=scores.device)
    items = budgets.shape[1]
    group = torch.where(groups < 0, items, groups)  # pads: a group of their own, after every item, budget 0
    by_score = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    group_by_score = group.gather(1, by_score)
    by_group = torch.sort(group_by_score, dim=1, stable=True)
    order = by_score.gather(1, by_group.indices)  # (B, N) token order: item, then score desc, then position
    sorted_group = by_group.values
    sizes = torch.zeros(batch, items + 1, dtype=torch.long, device=scores.device)
    sizes.scatter_add_(1, group, torch.ones_like(group))
    starts = sizes.cumsum(1) - sizes  # (B, M + 1) each group's first place in `order`
    rank = torch.arange(n, device=scores.device) - starts.gather(1, sorted_group)
    limit = torch.cat([budgets.to(scores.device, torch.long), budgets.new_zeros(batch, 1)], dim=1)
    keep_sorted = rank < limit.gather(1, sorted_group)
    return torch.zeros(batch, n, dtype=torch.bool, device=scores.device).scatter_(1, order, keep_sorted)


def topk_mask_per_media(scores: torch.Tensor, media_index: torch.Tensor, budget_per_media: list[int]) -> torch.Tensor:
    """Top-k within each media item: scores (N,), media_index (N,) -> keep mask (N,) bool."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for item, budget in enumerate(budget_per_media):
        members = (media_index == item).nonzero(as_tuple=True)[0]
        if members.numel() == 0:
            continue
        keep_mask[members[topk_mask(scores[members], budget)]] = True
    return keep_mask


class ScorerMethod(Method):
    """A method that scores each visual token; the engine keeps the top-k per media item in order.

    Subclasses implement `score(ctx) -> (N,) float`. Higher = more important.
    """

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        raise NotImplementedError

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        scores = self.score(ctx)
        if scores.shape != (ctx.num_visual,):
            raise PruneError(f"{type(self).__name__}.score returned {tuple(scores.shape)}, want ({ctx.num_visual},)")
        if ctx.budget_per_media is None:
            raise BudgetError(f"{type(self).__name__} needs a budget: pass keep=... to apply()")
        return topk_mask_per_media(scores, ctx.layout.media_index, ctx.budget_per_media)

    #: subclasses that can score a whole batch define `score_batch(batch) -> (B, N_max) float or None`
    score_batch = None

    def batch_select(self) -> SelectBatchFn | None:
        """`select_batch` when this class scores a batch with the same scores as `score` and keeps the top-k per
        item as `select` does: `score_batch` is defined where `score` and `select` are, or below them (a subclass
        that rewrites `score` or `select` without `score_batch` is run row by row, never with stale scores)."""
        owner = _owner(type(self), "score_batch")
        if owner is None or not all(issubclass(owner, _owner(type(self), name)) for name in ("score", "select")):
            return None
        return self.select_batch

    def select_batch(self, batch: BatchSelectionContext) -> torch.Tensor | None:
        """(B, N_max) bool: every row's top-k per media item of `score_batch`, or None when it declines."""
        if batch.budget_per_media is None:
            return None  # (a row without a budget: `select` raises the error, row by row)
        scores = self.score_batch(batch)
        if scores is None:
            return None
        if scores.shape != batch.media_index.shape:
            raise PruneError(
                f"{type(self).__name__}.score_batch returned {tuple(scores.shape)}, want "
                f"{tuple(batch.media_index.shape)} (batch.media_index)"
            )
        return topk_mask_batched(scores, batch.media_index, batch.budget_per_media)


def _owner(cls: type, name: str) -> type | None:
    """The class of `cls`'s MRO that defines `name` (None when none does, or it is None there)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return None if klass.__dict__[name] is None else klass
    return None


def per_media(
    ctx: SelectionContext, choose: Callable[[torch.Tensor, int], torch.Tensor | Selection]
) -> torch.Tensor | Selection:
    """Run a selector or merger item by item.

    `choose(member_index (n,), budget) -> keep mask (n,)` or a `Selection` over those n tokens. The
    per-item results are stitched back in sequence order.
    """
    if ctx.budget_per_media is None:
        raise BudgetError("this method needs a budget: pass keep=... to apply()")
    keep_mask = torch.zeros(ctx.num_visual, dtype=torch.bool, device=ctx.visual_features.device)
    new_features = None  # (cloned from the features when an item first merges: selectors never copy them)
    for item, budget in enumerate(ctx.budget_per_media):
        members = (ctx.layout.media_index == item).nonzero(as_tuple=True)[0]
        if members.numel() == 0:
            continue
        result = choose(members, budget)
        if isinstance(result, Selection):
            item_keep = result.keep_mask
            if result.features is not None:
                new_features = ctx.visual_features.clone() if new_features is None else new_features
                new_features[members[item_keep]] = result.features.to(new_features.dtype)
        else:
            item_keep = result
        keep_mask[members[item_keep]] = True
    if new_features is not None:
        return Selection(keep_mask, new_features[keep_mask])
    return keep_mask

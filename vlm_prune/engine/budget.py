"""Budgets: validate `keep` and turn it into exact per-media-item token counts."""

from __future__ import annotations

import math
import numbers

from vlm_prune.errors import BudgetError


def validate_keep(keep: object, *, allow_none: bool = True) -> float | int | None:
    """Return `keep` as a float fraction in (0, 1] or a positive int count; raise BudgetError otherwise."""
    if keep is None:
        if allow_none:
            return None
        raise BudgetError("keep is required: pass a fraction in (0, 1] (e.g. keep=0.25) or a token count")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise BudgetError(
            f"keep must be a number: a fraction in (0, 1] such as 0.25, or an int count per media item such as "
            f"64; got {keep!r}"
        )
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise BudgetError(f"keep={keep}: an int count must be >= 1 (tokens kept per media item)")
        return int(keep)
    value = float(keep)
    if not math.isfinite(value) or value <= 0.0 or value > 1.0:
        raise BudgetError(f"keep={keep}: a fraction must be in (0, 1]; for a token count pass an int (e.g. keep=64)")
    return value


def tokens_to_keep(keep: float | int, original: int, current: int) -> int:
    """Tokens of one media item to keep after a stage.

    keep: fraction of the ORIGINAL count (rounded half up, at least 1) or an int count.
    original: the item's tokens before any pruning; current: its tokens entering this stage.
    The result never exceeds `current` (a later stage cannot grow an item).
    """
    if original == 0 or current == 0:
        return 0
    if isinstance(keep, float):
        wanted = max(1, math.floor(keep * original + 0.5))
    else:
        wanted = keep
    return min(wanted, current)


def split_keep(keep: float | int | None, parts: int) -> list[float | int | None]:
    """Cumulative budgets for `parts` composed methods whose final budget is `keep`.

    A fraction is split geometrically: component i keeps keep ** ((i + 1) / parts) of the original
    tokens, so every component removes the same share of what reaches it.
    """
    if parts == 1 or keep is None:
        return [keep] * parts
    if isinstance(keep, int):
        raise BudgetError(
            "an int keep is ambiguous for a composition; pass a fraction (e.g. keep=0.25), or build the "
            "methods yourself with their own keep"
        )
    return [keep ** ((i + 1) / parts) for i in range(parts)]

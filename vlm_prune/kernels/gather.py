"""Gather kept tokens into a contiguous, possibly re-padded sequence (torch reference)."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1, fill: float | int = 0) -> torch.Tensor:
    """Gather along the sequence dimension, with -1 meaning "padding slot".

    Args:
        x: (B, L, *rest) when dim=1, or any tensor whose `dim` is the sequence axis and whose dim 0 (or the
           axis before the sequence, for dim=-2 layouts like (B, H, L, d)) is the batch.
        index: (B, L') long. Column of x to take for each output slot; -1 fills with `fill`.
        dim: the sequence axis of x (1 for (B, L, D), 2 for (B, H, L, d) caches).

    Returns:
        (B, L', *rest) (sequence axis replaced by L').
    """
    dim = dim % x.ndim
    valid = index >= 0
    safe = index.clamp(min=0)
    # Broadcast the (B, L') index over every axis except batch (0) and `dim`.
    view_shape = [1] * x.ndim
    view_shape[0] = safe.shape[0]
    view_shape[dim] = safe.shape[1]
    expand_shape = list(x.shape)
    expand_shape[dim] = safe.shape[1]
    expanded = safe.view(view_shape).expand(expand_shape)
    out = torch.gather(x, dim, expanded)
    if not bool(valid.all()):
        out = out.masked_fill(~valid.view(view_shape).expand(expand_shape), fill)
    return out

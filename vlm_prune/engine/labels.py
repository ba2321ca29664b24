"""The caller's labels on a pruned forward: gathered to the kept positions, and the model's loss over them."""

from __future__ import annotations

import torch


def kept_labels(labels: torch.Tensor, kept_columns: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels of the kept positions.

    labels: (B, L0) over the original columns; kept_columns: (B, L) original column of each kept position,
    -1 for padding slots the engine added. Returns (B, L), `ignore_index` at the added slots.
    """
    gathered = labels.gather(1, kept_columns.clamp(min=0))
    return torch.where(kept_columns >= 0, gathered, torch.full_like(gathered, ignore_index))


def with_loss(output, loss: torch.Tensor):
    """The model output with `loss` in first place, as the model returns it when given labels."""
    if isinstance(output, tuple):
        return (loss, *output)
    return type(output)(loss=loss, **{key: value for key, value in output.items() if key != "loss"})

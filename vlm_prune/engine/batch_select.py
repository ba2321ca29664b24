"""One stage's selection for the whole batch at once, for methods that can (`Stage.select_batch`).

Per row, the engine builds a `SelectionContext`, calls `select`, checks the keep mask and concatenates the rows'
masks (`stage_run._select_rows`): at batch 8 that is 8 contexts, 8 validations and, for a scorer such as FastV,
8 chains of score, sort and scatter (each op a kernel launch on a GPU). A method whose scores come from batched
tensors (FastV's head-mean of the last token's attention row) instead gets ONE `BatchSelectionContext` and
returns ONE (B, N_max) keep mask; the engine reads it in the stage's one device->host copy and flattens it to the
row-major (P,) mask the per-row path would have made. The masks are the same as the per-row path's (tests).

The batch is served only when each row's valid slots are its last ones (left padding: every row's last token sits
at slot L-1, where the stage's batched attention rows are taken), no pre-LLM signal tables are asked for (they
fill per-row contexts) and every row with visual tokens has a budget. Anything else, or a method that declines
(returns None), takes the per-row path.
"""

from __future__ import annotations

import numpy as np
import torch

from vlm_prune.engine.batch import StageInput, to_device
from vlm_prune.engine.context import BatchSelectionContext
from vlm_prune.engine.stage_attention import StageAttention
from vlm_prune.errors import PruneError
from vlm_prune.methods.base import Stage


def batch_context(
    forward, stage: Stage, hidden: torch.Tensor, plan: StageInput, budgets: list, padded, adapter,
    attention: tuple | None,
) -> BatchSelectionContext | None:  # fmt: skip
    """The stage's `BatchSelectionContext` over the current slots of `forward` (the handle's `_Forward`), or None
    when the batch goes row by row: one row (its row context is no dearer), a row with gaps in its valid slots, a
    row with tokens and no budget. Its tensors are made on first read, as a row context's views are.

    budgets: per row, tokens to keep per media item (None: the method decides); padded: the stage's `_Once` of
    (2, B, N_max) device slots; attention: (layer k-1's input, layer k's input) for in-LLM scorers, or None."""
    counts = plan.counts
    if len(counts) == 1:
        return None
    for row, count in enumerate(counts):
        if count and (not plan.contiguous[row] or budgets[row] is None):
            return None
    attention_fn = None
    if attention is not None:
        attention_fn = StageAttention(adapter.layers, *attention, forward.mask).batch
    context = object.__new__(_LazyBatchContext)  # (the fields set directly, the lazy ones made on first read)
    context.__dict__.update(layer=stage.layer, num_visual=counts, hidden_states=hidden, attention_mask=forward.mask,
                            attention_fn=attention_fn, _made=(forward.host, plan, budgets, padded, hidden.device))
    return context


class _LazyBatchContext(BatchSelectionContext):
    """A `BatchSelectionContext` whose `visual_index`, `media_index` and `budget_per_media` are made on first read
    (a missing instance attribute reaches `__getattr__`), from the host mirror, the stage input and budgets."""

    def __getattr__(self, name: str):
        made = self.__dict__.get("_made")
        if made is None or name not in ("visual_index", "media_index", "budget_per_media"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        host, plan, budgets, padded, device = made
        if name == "visual_index":
            value = padded.get()[0]
        elif name == "media_index":
            value = to_device(torch.from_numpy(host.padded_media(plan)), device)
        else:
            value = to_device(torch.from_numpy(_budget_table(budgets)), device)
        self.__dict__[name] = value
        return value


def _budget_table(budgets: list) -> np.ndarray:
    """(B, M) int64: every row's tokens to keep per media item (0 past a row's items, and for rows without)."""
    width = max((len(row) for row in budgets if row is not None), default=0)
    table = np.zeros((len(budgets), max(width, 1)), dtype=np.int64)
    for row, row_budgets in enumerate(budgets):
        if row_budgets is not None:
            table[row, : len(row_budgets)] = row_budgets
    return table


def read_batch_keep(stage: Stage, keep: torch.Tensor, plan: StageInput) -> torch.Tensor:
    """The (B, N_max) keep mask of `select_batch` as the stage's (P,) host keep mask, row-major (the stage's one
    device->host copy); raises a PruneError for a mask of the wrong dtype or shape."""
    width = max(plan.counts, default=0)
    expected = (len(plan.counts), width)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise PruneError(
            f"{stage.name}.select_batch returned {got}; it must return a bool mask of shape {expected} "
            "(rows, batch.visual_index.shape[1]) or None"
        )
    host_keep = keep.cpu().numpy()  # THE one device->host read of the stage
    if min(plan.counts, default=0) == width:  # no pad entry
        return torch.from_numpy(host_keep.reshape(-1))
    real = np.arange(width)[None, :] < np.asarray(plan.counts)[:, None]  # (a row's tokens fill its first places)
    return torch.from_numpy(host_keep[real])

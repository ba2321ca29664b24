"""Re-entry: an in-LLM stage at which visual tokens dropped earlier come back and the sequence GROWS.

LVLM_CSP's scatter (arXiv 2504.10854; the rule is ours, `shared/METHODS.md`): a stage that drops tokens may
say which kept token represents each dropped one (`Selection.represents`). The engine then remembers, per
sample, for every visual token that entered that stage:

* its representative's original column,
* the offset x_i - x_rep between its own input at that stage and the input its representative entered with
  (the representative's replacement features when the stage merged, e.g. a cluster mean),
* its rotary position (1 row, or the M-RoPE rows).

At a later re-entry stage (`Stage.reenter`) every remembered token that is absent comes back, and every
remembered token (present or not) gets

    h_i(s1) = h_rep(s1) + (x_i - x_rep)        i.e. h_i(s1) = e_i + (h_rep(s1) - e_rep) at layer 0,

so a kept medoid keeps its hidden state and a token a cluster mean stood for gets its own embedding back
plus the update the mean received over the layers [stage, s1). The sequence is rebuilt in original column
order (rows left-padded with -1 slots), and the rotary cos/sin are recomputed for the new slots.

Only policy "preserve" is supported: re-entering tokens take their original positions back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm_prune.engine.context import Selection
from vlm_prune.engine.stats import StageStats
from vlm_prune.errors import PruneError


@dataclass
class RowMemory:
    """What one sample needs to bring tokens back (N = visual tokens entering the remembering stage).

    columns: (N,) long, original columns of those tokens, ascending.
    representative_columns: (N,) long, original column of each token's representative (itself if kept).
    offset: (N, D) x_i - x_rep at the remembering stage.
    rope: (R, N) rotary positions of those tokens.
    """

    columns: torch.Tensor
    representative_columns: torch.Tensor
    offset: torch.Tensor
    rope: torch.Tensor


def remember(
    memory: dict[int, RowMemory],
    row: int,
    selection: Selection,
    visual_columns: torch.Tensor,
    visual_inputs: torch.Tensor,
    visual_rope: torch.Tensor,
) -> None:
    """Record row `row`'s representatives if `selection.represents` is set (a no-op otherwise).

    visual_columns: (N,) original columns of the stage's visual tokens; visual_inputs: (N, D) their inputs
    at the stage; visual_rope: (R, N) their rotary positions.
    """
    represents = selection.represents
    if represents is None:
        return
    keep = torch.as_tensor(selection.keep_mask, device=visual_inputs.device).bool()
    represents = torch.as_tensor(represents, device=visual_inputs.device).long()
    n = visual_columns.shape[0]
    if represents.shape != (n,) or bool((represents < 0).any() | (represents >= n).any()):
        raise PruneError(f"Selection.represents must be (N,) = ({n},) indices into the stage's visual tokens")
    kept_index = keep.nonzero(as_tuple=True)[0]
    if not torch.equal(represents[kept_index], kept_index) or not bool(keep[represents].all()):
        raise PruneError("Selection.represents must map every token to a KEPT token, and each kept token to itself")
    entered = visual_inputs.clone()
    if selection.features is not None:
        entered[kept_index] = selection.features.to(entered.dtype)
    if row in memory:
        raise PruneError("only one stage of a forward may record representatives for re-entry")
    memory[row] = RowMemory(
        columns=visual_columns.clone(),
        representative_columns=visual_columns[represents].clone(),
        offset=visual_inputs - entered[represents],
        rope=visual_rope.clone(),
    )


def reenter_tokens(
    forward,
    hidden: torch.Tensor,
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    rope_rows: int,
    stage_name: str,
    stage_layer: int,
    position_policy: str,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Bring every remembered token back into `forward` (the engine's `_Forward`) at an in-LLM stage.

    hidden: (B, L, D) the layer's input. Updates `forward.columns` (B, L'), `forward.mask`, `forward.rope`
    (R, B, L'), `forward.shift`, each sample's `present` / `layout`, and appends a `StageStats`.
    Returns the new hidden states (B, L', D) and the rotary (cos, sin) of the new slots.
    """
    if position_policy != "preserve":
        raise PruneError(
            "re-entering tokens take their original positions back, which needs position_policy='preserve'"
        )
    started = time.perf_counter()
    batch, length = forward.columns.shape
    past = forward.mask.shape[1] - length
    device = hidden.device
    rows_columns, rows_hidden, rows_mask, rows_rope = [], [], [], []
    tokens_in, tokens_out = [], []
    for row in range(batch):
        sample = forward.samples[row]
        columns = forward.columns[row]
        real = columns >= 0
        current = columns[real]
        row_hidden = hidden[row, real]
        row_mask = forward.mask[row, past:][real]
        row_rope = forward.rope[:, row][:, real]
        tokens_in.append(_counts(sample))
        memory = forward.reentry.get(row)
        if memory is not None:
            memory_columns = memory.columns.to(device)
            present_now = torch.isin(memory_columns, current)
            rep_slot = torch.searchsorted(current, memory.representative_columns.to(device)).clamp(max=len(current) - 1)
            if not torch.equal(current[rep_slot], memory.representative_columns.to(device)):
                raise PruneError(
                    f"{stage_name}: a representative was dropped before re-entry; stages between the clustering "
                    "and the re-entry must keep every representative"
                )
            restored = row_hidden[rep_slot] + memory.offset.to(device, hidden.dtype)
            returning = ~present_now
            all_columns, order = torch.sort(torch.cat([current, memory_columns[returning]]))
            new_hidden = torch.cat([row_hidden, restored[returning]])[order]
            back = row_mask.new_ones(int(returning.sum()))
            new_mask = torch.cat([row_mask, back])[order]
            new_rope = torch.cat([row_rope, memory.rope.to(device, row_rope.dtype)[:, returning]], dim=1)[:, order]
            present_slots = torch.searchsorted(all_columns, memory_columns[present_now])
            new_hidden[present_slots] = restored[present_now]
            current, row_hidden, row_mask, row_rope = all_columns, new_hidden, new_mask, new_rope
            sample.present |= torch.isin(sample.media.visual_columns, memory.columns.cpu())
            sample.layout = sample.media.layout.select(sample.present)
            forward.shift[row] -= int(returning.sum())
        tokens_out.append(_counts(sample))
        rows_columns.append(current)
        rows_hidden.append(row_hidden)
        rows_mask.append(row_mask)
        rows_rope.append(row_rope)
    width = max(len(c) for c in rows_columns)
    columns = torch.full((batch, width), -1, dtype=forward.columns.dtype, device=device)
    new_hidden = hidden.new_zeros(batch, width, hidden.shape[-1])
    mask = forward.mask.new_zeros(batch, width)
    rope = forward.rope.new_zeros(forward.rope.shape[0], batch, width)
    for row in range(batch):
        start = width - len(rows_columns[row])
        columns[row, start:] = rows_columns[row]
        new_hidden[row, start:] = rows_hidden[row]
        mask[row, start:] = rows_mask[row]
        rope[:, row, start:] = rows_rope[row]
    forward.columns = columns
    forward.mask = torch.cat([forward.mask[:, :past], mask], dim=1)
    forward.rope = rope
    with torch.no_grad():
        cos, sin = rotary(new_hidden, rope[0] if rope_rows == 1 else rope)
    forward.stats.stages.append(
        StageStats(stage_name, stage_layer, tokens_in, tokens_out, time.perf_counter() - started)
    )
    return new_hidden, (cos, sin)


def _counts(sample) -> list[int]:
    layout = sample.layout
    return torch.bincount(layout.media_index.cpu(), minlength=layout.num_media).tolist()

"""One pruning stage over the current slots of a prefill: the per-row selection, the one read, the compaction.

`run_stage` is what the handle (`engine/handle.py`) calls at layer 0 (pre-LLM, on `inputs_embeds`) and at an in-LLM
stage's layer k (on that layer's input). It works on the handle's per-forward state (`_Forward`: columns, mask,
rope, shift, samples and the host mirror `HostBatch`) and changes it in place:

1. `HostBatch.stage_input` gives the shapes (per row: visual tokens present, their slots, budgets);
2. a stage with `select_batch` (FastV) selects every row at once where the batch allows
   (`engine/batch_select.py`); otherwise `_select_rows` builds each row's `SelectionContext` (views of hidden
   and ids where the row's slots are one run, lazily computed signals, attention rows and later segments) and
   calls the stage's `select`; attention rows at host-int queries (the last token) come from one batched
   recompute for the stage (`stage_attention.py`);
3. `read_keeps` concatenates the keep masks and reads them in ONE device->host copy (the stage's only sync);
4. `_apply_keep` advances the host mirror, checks the budgets, records the stage's keep mask for the samples'
   layouts (`HostBatch.stage_keeps`) and compacts hidden states, columns, mask and rotary positions in one
   `compact_sequence` (fused on CUDA);
5. `_replace_features`: merging methods' kept tokens take the features the method gave them (one scatter).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from vlm_prune.adapters.base import Adapter
from vlm_prune.engine.attention_rows import stage_rows_fn
from vlm_prune.engine.batch import StageInput, row_views, to_device
from vlm_prune.engine.batch_select import batch_context, read_batch_keep
from vlm_prune.engine.calls import read_keeps, segments_later
from vlm_prune.engine.context import Selection, SelectionContext
from vlm_prune.engine.records import defaults, fresh
from vlm_prune.engine.reentry import remember
from vlm_prune.engine.signals import SignalRecorder
from vlm_prune.engine.stage_attention import StageAttention
from vlm_prune.engine.stats import StageStats
from vlm_prune.errors import PruneError
from vlm_prune.kernels import compact_sequence
from vlm_prune.kernels.reference import take_rows
from vlm_prune.methods.base import Stage


def run_stage(
    forward,
    stage: Stage,
    hidden: torch.Tensor,
    *,
    call: dict,
    adapter: Adapter,
    seed: int | None,
    position_policy: str,
    signals: dict | None = None,
    recorder: SignalRecorder | None = None,
    attention: tuple | None = None,
) -> torch.Tensor:
    """Run one stage on the current slots of `forward` (the handle's `_Forward`); compact `hidden` (B, L, D) and
    the forward state (columns, mask, rope, shift, samples, host mirror, stats). Returns the new hidden (B, L', D).

    call: the call's kwargs as the handle read them (`input_ids`, and `host`: their host copies); signals: the
    signal tables a pre-LLM stage asked for (`recorder` fills each row's context from them); attention: (layer
    k-1's input, layer k's input) for in-LLM stages that score by attention rows.
    Shapes come from the host mirror (`engine/batch.py`); the methods' keep masks are the stage's one read.
    """
    host = forward.host
    started = time.perf_counter()
    plan = host.stage_input()
    budgets = host.budgets(stage.keep, plan.tokens_in)
    # (2, B, N_max): visual slots, their places among the valid ones; made and uploaded only if read
    padded = _Once(lambda: to_device(plan.padded, hidden.device))
    batch_keep = None
    if stage.select_batch is not None and signals is None:  # the whole batch at once (`engine/batch_select.py`)
        batch = batch_context(forward, stage, hidden, plan, budgets, padded, adapter, attention)
        batch_keep = None if batch is None else stage.select_batch(batch)
    if batch_keep is not None:
        keep, groups, selections = read_batch_keep(stage, batch_keep, plan), {}, {}  # THE one read of the stage
    else:
        keeps, selections = _select_rows(
            forward, stage, hidden, plan, budgets, padded, call, adapter, seed, signals, recorder, attention
        )
        keep, groups = read_keeps(keeps, selections, hidden.device)  # THE one device->host read of the stage
    hidden, new_slot = _apply_keep(forward, stage, hidden, plan, budgets, keep, groups, position_policy)
    hidden = _replace_features(hidden, forward.index is None, plan, keep, new_slot, selections)
    forward.stats.stages.append(
        StageStats(stage.name, stage.layer, plan.tokens_in, host.current_counts, time.perf_counter() - started)
    )
    return hidden


def _select_rows(
    forward,
    stage: Stage,
    hidden: torch.Tensor,
    plan: StageInput,
    budgets: list,
    padded: _Once,
    call: dict,
    adapter: Adapter,
    seed: int | None,
    signals: dict | None,
    recorder: SignalRecorder | None,
    attention: tuple | None,
) -> tuple[list[torch.Tensor], dict[int, Selection]]:
    """Every row's selection: (the keep masks (N_r,) bool of the rows with visual tokens, in row order; {row:
    Selection} for the rows whose method returned one). Each row's visual features (N_r, D) are a view of hidden
    where the row's tokens are one run of slots, else a row of one gather."""
    host, device = forward.host, hidden.device
    batch, length = forward.columns.shape
    if plan.runs is not None:  # every row's visual tokens are consecutive slots: views of hidden, no copy
        if batch == 1:  # (one view, no unbind)
            feature_rows = [hidden[0, plan.runs[0] : plan.runs[0] + plan.counts[0]]]
        else:
            feature_rows = [row[s : s + n] for row, s, n in zip(hidden.unbind(0), plan.runs, plan.counts)]
    else:  # (B, N_max, D): every row's visual tokens in one gather (pad entries are never read: rows are sliced)
        slots = padded.get()[0]
        ragged = min(plan.counts, default=0) < slots.shape[-1]  # some row has pad entries (-1)
        features = take_rows(hidden, 1, slots.clamp(min=0) if ragged else slots)
        feature_rows = row_views(features, None, plan.counts)
    device_ids = call["input_ids"]
    if forward.columns.shape == device_ids.shape and host.all_present and not forward.reentry:
        ids_now = device_ids  # nothing removed (or re-entered) yet: slot == column
    else:  # (made only if a method reads `ctx.input_ids`)
        ids_now = _Once(lambda: device_ids.gather(1, forward.columns.to(device_ids.device).clamp(min=0)))  # pads
    host_ids = call["host"]["input_ids"]  # (the host copy `read_call` made; rows sliced on use)
    firsts = [length - valid for valid in plan.valid_counts]
    # in-LLM scorers: every row's rows at the same padded query slots come from one batched recompute
    stage_attention = None if attention is None else StageAttention(adapter.layers, *attention, forward.mask)
    # what every row's lazy views are taken from (one tuple for the stage; `_LAZY`, `_RowContext.segments_fn`)
    views = (hidden, ids_now, padded, adapter, host_ids, host.columns, forward.samples)
    keeps, selections, layer, samples, select = [], {}, stage.layer, forward.samples, stage.select
    for row in range(batch):
        count = plan.counts[row]
        if count == 0:
            continue
        first, row_budgets = firsts[row], budgets[row]
        if plan.contiguous[row]:  # the usual case (left padding): views, no copies, made on first read
            slots = first
        else:  # (the host slots ride along for the segment map)
            where = host.valid[row].nonzero(as_tuple=True)[0]
            slots = (to_device(where, device), where)
        ctx = _RowContext.make(views, row, slots, layer, count, None if row_budgets is None else sum(row_budgets),
                               row_budgets, feature_rows[row], samples[row].layout, seed)  # fmt: skip
        if signals is not None:
            sample = samples[row]
            recorder.fill(ctx, signals, row, sample.media.layout.kind[sample.present], sample.present)
        if attention is not None:
            ctx.attention_fn = stage_rows_fn(adapter.layers, *attention, row, ctx._device_slots(length))
            if type(slots) is int:  # one run of slots, first..L-1: batched rows for host-int queries
                ctx.__dict__["_batched"] = (stage_attention, row, first)
        result = select(ctx)
        if isinstance(result, Selection):
            if result.represents is not None:  # remembered for re-entry (reentry.py; a no-op without)
                rope_here = forward.rope[:, row, padded.get()[0, row, :count]]
                columns = to_device(samples[row].visual_columns, device)
                remember(forward.reentry, row, result, columns, feature_rows[row], rope_here)
            selections[row], result = result, result.keep_mask
        keep_mask = result if isinstance(result, torch.Tensor) and result.device == device else torch.as_tensor(
            result, device=device
        )
        if keep_mask.dtype != torch.bool or keep_mask.shape != (count,):
            raise PruneError(
                f"{stage.name}.select returned {keep_mask.dtype} {tuple(keep_mask.shape)}; it must return a "
                f"bool mask of shape ({count},) (ctx.num_visual)"
            )
        keeps.append(keep_mask)
    return keeps, selections


class _RowContext(SelectionContext):
    """The engine's `SelectionContext` of one row: its row views (`hidden_states`, `input_ids`, `visual_index`) are
    made on first read (most methods read none of them: random, pool and DivPrune read the visual features only).
    A missing instance attribute reaches `__getattr__`, which makes it from the stage's shared `views` (hidden,
    ids, padded slots) and the row's `_slots` (its first valid slot, or its valid slots), and stores it."""

    @classmethod
    def make(cls, views: tuple, row: int, slots, layer, num_visual, budget, budget_per_media, visual_features, layout,
             seed) -> _RowContext:  # fmt: skip
        """views: (hidden (B, L, D), ids (B, L) or `_Once`, padded `_Once`, adapter, host ids (B, L0), host columns
        (B, L), the forward's samples), shared by the stage's rows; slots: the row's first valid slot (an int: its
        valid slots are first..L-1) or (its (V,) valid slots on the device, the same on the host)."""
        return fresh(cls, {**_CONTEXT_DEFAULTS, "extras": {}, "_views": views, "_row": row, "_slots": slots,
                           "layer": layer, "num_visual": num_visual, "budget": budget,
                           "budget_per_media": budget_per_media, "visual_features": visual_features, "layout": layout,
                           "seed": seed})  # (the dataclass defaults, then the values: no __init__ per row)

    def _device_slots(self, length: int):
        """The row's valid slots for indexing the device tensors: a slice first..L-1, or the (V,) slots."""
        slots = self._slots
        return slice(slots, length) if type(slots) is int else slots[0]

    @property
    def segments_fn(self):
        """The row's segment map builder, made on first read (`engine/calls.segments_later`); settable."""
        made = self.__dict__.get("_segments_fn", _UNSET)
        if made is _UNSET:
            _, _, _, adapter, host_ids, host_columns, samples = self._views
            slots = self._slots
            where = slice(slots, None) if type(slots) is int else slots[1]
            made = self._segments_fn = segments_later(adapter, host_ids, host_columns, self._row, where,
                                                      samples[self._row].media)  # fmt: skip
        return made

    @segments_fn.setter
    def segments_fn(self, value) -> None:
        self.__dict__["_segments_fn"] = value

    def attention_rows(self, query_index: torch.Tensor | int, layer: int | None = None) -> torch.Tensor:
        """As `SelectionContext.attention_rows`; a host-int query of a row whose slots are one run is served from
        the stage's batched rows (`engine/stage_attention.py`), anything else per row."""
        batched = self.__dict__.get("_batched")
        if batched is not None and type(query_index) is int and 0 <= query_index < self.hidden_states.shape[0]:
            stage_attention, row, first = batched
            rows = stage_attention.rows(row, first, (query_index,), self.layer - 1 if layer is None else layer)
            if rows is not None:
                return rows
        return super().attention_rows(query_index, layer)

    def __getattr__(self, name: str):
        make = _LAZY.get(name)
        views = self.__dict__.get("_views")
        if make is None or views is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = make(views, self._row, self._slots, self.num_visual)
        return value


_CONTEXT_DEFAULTS = {  # (`segments_fn` is `_RowContext`'s own, made on first read)
    name: value for name, value in defaults(SelectionContext).items() if name != "segments_fn"
}
_UNSET = object()


class _Once:
    """A tensor made on first use (`_Once(fn).get()`), then kept."""

    def __init__(self, make) -> None:
        self._make, self._value = make, None

    def get(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._make()
        return self._value


def _rows_of(tensor) -> torch.Tensor:
    return tensor.get() if isinstance(tensor, _Once) else tensor


def _row_of(tensor, row: int, slots) -> torch.Tensor:
    """tensor[row, slots:] (a view) when `slots` is the row's first valid slot, else tensor[row, device slots]."""
    rows = _rows_of(tensor)
    if type(slots) is int:
        return rows[row] if slots == 0 else rows[row, slots:]
    return rows[row, slots[0]]


def _row_head(padded: _Once, row: int, count: int) -> torch.Tensor:
    """The places of row `row`'s visual tokens: padded[1, row, :count] (a view)."""
    places = padded.get()[1]
    return places[row] if count == places.shape[1] else places[row, :count]


#: the row views a `_RowContext` makes on first read: name -> (views, row, slots, count) -> tensor
_LAZY = {
    "hidden_states": lambda views, row, slots, count: _row_of(views[0], row, slots),
    "input_ids": lambda views, row, slots, count: _row_of(views[1], row, slots),
    "visual_index": lambda views, row, slots, count: _row_head(views[2], row, count),
}


def _apply_keep(
    forward,
    stage: Stage,
    hidden: torch.Tensor,
    plan: StageInput,
    budgets: list,
    keep: torch.Tensor,
    groups: dict,
    position_policy: str,
) -> tuple[torch.Tensor, Callable]:
    """Advance the host mirror by the stage's (P,) host keep mask and compact the forward state; returns (hidden
    (B, L', D), (K,) the new slot of every kept visual token). `forward.index` is left None when nothing was
    removed (the slots stay as they are), else the (B, L') compaction index on hidden's device."""
    host, device = forward.host, hidden.device
    index, removed, new_slot = host.apply(plan, keep, removed=position_policy == "compact")
    kept = [sum(counts) for counts in host.current_counts]
    if kept != [plan.counts[row] if wanted is None else sum(wanted) for row, wanted in enumerate(budgets)]:
        for row, row_budgets in enumerate(budgets):  # (rows without tokens keep 0, whatever their budget)
            if row_budgets is not None and plan.counts[row] and kept[row] != sum(row_budgets):
                raise PruneError(f"{stage.name} kept {kept[row]} tokens, its budget is {sum(row_budgets)}")
    host.stage_keeps.append((keep, plan.starts, plan.counts, kept))  # the samples' layouts follow on read
    for row, group in groups.items():  # (a copy: the layout may be the adapter's shared template)
        sample = forward.samples[row]
        sample.layout = dataclasses.replace(sample.layout, group=group)
    forward.index = None  # None: the stage kept every token, the slots stay as they are
    if kept != plan.counts:
        forward.shift = [shift + count - now for shift, count, now in zip(forward.shift, plan.counts, kept)]
        if position_policy == "compact":
            removed_before = to_device(removed.cumsum(dim=1), device).to(forward.rope.dtype)
            forward.rope = forward.rope - removed_before.unsqueeze(0)
        forward.index = to_device(index, device)
        # one fused launch on CUDA (Triton), the torch reference elsewhere: hidden, columns, mask, rope; on a
        # CPU the mirror's columns ARE the compacted columns (same values, no gather)
        on_host = device.type == "cpu" and type(hidden) is torch.Tensor
        hidden, columns, forward.mask, forward.rope = compact_sequence(
            hidden, forward.index, columns=None if on_host else forward.columns, mask=forward.mask,
            rope=forward.rope, padded=host.index_padded,
        )
        forward.columns = host.columns if on_host else columns
    return hidden, new_slot


def _replace_features(
    hidden: torch.Tensor, in_place_unsafe: bool, plan: StageInput, keep: torch.Tensor, new_slot: Callable,
    selections: dict[int, Selection],
) -> torch.Tensor:
    """Merging methods: the kept tokens of their rows take the features the method gave them, in one scatter.

    in_place_unsafe: `hidden` is still the caller's tensor (the stage compacted nothing): it is cloned first."""
    device = hidden.device
    replaced = [row for row, selection in selections.items() if selection.features is not None]
    if replaced:  # merging methods: the kept tokens take the features the method gave them
        hidden = hidden.clone() if in_place_unsafe else hidden  # never write into the caller's tensor
        # one scatter for every replaced row: their kept tokens, row-major, in the order of their features
        kept_rows, new_slot = plan.rows[keep.numpy()], new_slot()  # (K,) row and new slot of each kept token
        if len(replaced) == len(plan.counts) - plan.counts.count(0):  # every row with visual tokens: all of them
            rows, slots = torch.from_numpy(kept_rows), torch.from_numpy(new_slot)
        else:  # (a row table: np.isin sorts, ~10x the cost of two indexing ops on these small arrays)
            is_replaced = np.zeros(len(plan.counts), dtype=bool)
            is_replaced[replaced] = True
            which = is_replaced[kept_rows]
            rows, slots = torch.from_numpy(kept_rows[which]), torch.from_numpy(new_slot[which])
        rows, slots = to_device(rows, device), to_device(slots, device)
        features = [selections[row].features for row in replaced]
        hidden[rows, slots] = (features[0] if len(features) == 1 else torch.cat(features)).to(hidden.dtype)
    return hidden

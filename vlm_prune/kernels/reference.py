"""The torch reference of the compaction primitives: the oracle that the Triton kernels must match bit for bit.

Every function here is a chain of gathers (`torch.gather`, or the same copy by `index_select` / advanced indexing,
faster on CPU), one per tensor, exactly what the engine did before the fused kernels (`run_stage` in
`engine/stage_run.py` and `engine/ragged.py`'s `trim_segments`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Compacted(NamedTuple):
    """What `compact_sequence` returns; the side outputs are None when their input was None.

    hidden:  (B, L', D) the kept hidden states, left-padded (pad slots are zeros).
    columns: (B, L') the kept original columns, -1 at pad slots.
    mask:    (B, P + L') the 2-D attention mask: the P cached columns as they were, then the kept ones (0 at pads).
    rope:    (R, B, L') or (B, L') the kept rotary positions (0 at pads), in the layout they came in.
    """

    hidden: torch.Tensor
    columns: torch.Tensor | None
    mask: torch.Tensor | None
    rope: torch.Tensor | None


class PadSlots:
    """The pad slots (-1) of a (B, L') index, found once, and filled in every tensor gathered with it.

    A plain CPU index is read in numpy (a few array ops, ~1 us each, against ~5-10 us per small torch op in the
    engine's hooks) and its pads are filled with one `index_fill_` of the pad rows, in place; a device index (or
    its stand-in, a tensor subclass: `engine/syncs.py`) keeps torch ops and fills every time, since asking whether
    it has pads would sync the device. Either way the values are `masked_fill(pads, value)`'s.

    safe: (B, L') the index with its pads at slot 0 (every entry a valid slot to gather).
    any:  whether to fill (False only when the host knows the index has no pad slot).
    """

    __slots__ = ("safe", "any", "_host", "_device", "_rows")

    @property
    def host_pads(self) -> np.ndarray:
        """(B, L') numpy bool, the pad slots of a host index (`any` must be True and the index on the host)."""
        return self._host

    def __init__(self, index: torch.Tensor, padded: bool | None = None) -> None:
        self._host = self._device = None
        self._rows: dict[int, torch.Tensor] = {}
        if padded is False:  # the caller knows there is no pad slot
            self.safe, self.any = index, False
        elif index.device.type == "cpu" and type(index) is torch.Tensor:
            host = index.numpy()
            pads = host < 0
            self.any = bool(pads.any())
            self.safe, self._host = (torch.from_numpy(np.maximum(host, 0)), pads) if self.any else (index, None)
        else:
            self.safe, self.any, self._device = index.clamp(min=0), True, index < 0

    def fill_(self, out: torch.Tensor, value: float | int, batch_axis: int = 0, seq_axis: int = 1) -> torch.Tensor:
        """Fill the pad slots of `out` (..., B, [G...,] L', ...) in place, with B at `batch_axis` and L' at
        `seq_axis`; returns `out` (a new tensor from a gather: never a view of the caller's)."""
        if not self.any:
            return out
        if self._host is None or not out.is_contiguous():  # (a one-row gather of a strided tensor keeps strides)
            pads = torch.from_numpy(self._host) if self._device is None else self._device
            shape = [1] * out.ndim
            shape[batch_axis], shape[seq_axis] = pads.shape
            return out.masked_fill_(pads.view(shape), value)
        groups = math.prod(out.shape[batch_axis + 1 : seq_axis])
        rows = self._rows.get(groups)
        if rows is None:  # the flat (B * G * L',) positions of the pad slots, once per G
            pads = self._host if groups == 1 else np.broadcast_to(
                self._host[:, None, :], (self._host.shape[0], groups, self._host.shape[1]))  # fmt: skip
            rows = self._rows[groups] = torch.from_numpy(np.flatnonzero(pads))
        out.view(*out.shape[:batch_axis], -1, *out.shape[seq_axis + 1 :]).index_fill_(batch_axis, rows, value)
        return out


def take_rows(x: torch.Tensor, dim: int, safe: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, ..., L, ...) at the (B, L') index `safe` (no -1) along `dim` (1 or 2): what `torch.gather` with the
    index broadcast over the other axes copies (the same values, new and contiguous), by `index_select`: along
    `dim` for one row, else over the rows of x viewed as (B * [H *] L, rest) with `flat_rows`' index (`flat`, if
    the caller computed it for several tensors of this shape). On CPU 3-10x faster than the broadcast gather."""
    if safe.shape[0] == 1 and x.shape[0] == 1:  # (`flat`, given for one row, is safe[0])
        return x.index_select(dim, safe[0] if flat is None else flat)
    if not x.is_contiguous():
        batch = torch.arange(x.shape[0], device=x.device)  # (advanced indexing keeps x's layout: made contiguous)
        if dim == 1:
            return x[batch.view(-1, 1), safe].contiguous()
        heads = torch.arange(x.shape[1], device=x.device)
        return x[batch.view(-1, 1, 1), heads.view(1, -1, 1), safe.unsqueeze(1)].contiguous()
    flat = flat_rows(x, dim, safe) if flat is None else flat
    rest = x.shape[dim + 1 :]
    rows = x.reshape(-1, *rest) if rest else x.reshape(-1)
    return rows.index_select(0, flat).view(*x.shape[:dim], safe.shape[1], *rest)


def flat_rows(x: torch.Tensor, dim: int, safe: torch.Tensor) -> torch.Tensor:
    """The index of `take_rows` into x (B, [H,] L, ...) viewed as rows: (B [* H] * L',) long.

    A plain CPU index is combined in numpy (two array ops, ~1 us each, against ~4 us per small torch op)."""
    groups = x.shape[0] * (x.shape[1] if dim == 2 else 1)
    if safe.device.type == "cpu" and type(safe) is torch.Tensor:
        starts = np.arange(0, groups * x.shape[dim], x.shape[dim], dtype=np.int64).reshape(x.shape[0], -1, 1)
        return torch.from_numpy((starts + safe.numpy()[:, None, :]).reshape(-1))
    starts = torch.arange(groups, device=x.device).view(x.shape[0], -1, 1) * x.shape[dim]
    return (starts + safe.unsqueeze(1)).reshape(-1)


def take_rows_all(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> list[torch.Tensor]:
    """`take_rows(t, 1, index)` of every (B, L, d) tensor at the (B, L') `index` (no -1), the row index made once
    per (B, L) and contiguity (as `trim_reference` makes it once per cache shape)."""
    shared: dict[tuple, torch.Tensor | None] = {}
    out = []
    for tensor in tensors:
        key = (tensor.shape[:2], tensor.is_contiguous())
        if key not in shared:
            shared[key] = index[0] if index.shape[0] == 1 else flat_rows(tensor, 1, index) if key[1] else None
        out.append(take_rows(tensor, 1, index, shared[key]))
    return out


def gather_reference(
    x: torch.Tensor, index: torch.Tensor, dim: int = 1, fill: float | int = 0, padded: bool | None = None
) -> torch.Tensor:
    """Gather along the sequence dimension, with -1 meaning "padding slot".

    Args:
        x: (B, L, *rest) when dim=1, or any tensor whose `dim` is the sequence axis and whose dim 0 is the batch
           (e.g. (B, H, L, d) caches with dim=2).
        index: (B, L') long. Column of x to take for each output slot; -1 fills with `fill`.
        dim: the sequence axis of x.
        padded: whether `index` holds pad slots, when the caller knows it on the host (False: a plain gather,
            nothing to find or fill); None = find out.

    Returns:
        (B, L', *rest) (sequence axis replaced by L'), contiguous.
    """
    dim = dim % x.ndim
    if padded is False and dim in (1, 2) and x.shape[0] == index.shape[0]:
        return take_rows(x, dim, index)
    pads = PadSlots(index, padded)
    if dim in (1, 2) and x.ndim >= dim + 1 and x.shape[0] == index.shape[0]:
        out = take_rows(x, dim, pads.safe)
    else:  # broadcast the (B, L') index over every axis except batch (0) and `dim`
        view_shape = [1] * x.ndim
        view_shape[0], view_shape[dim] = index.shape
        expand_shape = list(x.shape)
        expand_shape[dim] = index.shape[1]
        out = torch.gather(x, dim, pads.safe.view(view_shape).expand(expand_shape)).contiguous()
    return pads.fill_(out, fill, 0, dim)


def compact_reference(
    hidden: torch.Tensor,
    index: torch.Tensor,
    columns: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    rope: torch.Tensor | None = None,
    *,
    padded: bool | None = None,
) -> Compacted:
    """Compact a sequence and its per-slot metadata with one gather each (see `Compacted` for the shapes).

    padded: whether `index` holds pad slots (-1), if the caller knows it on the host; None = find out.

    Args:
        hidden: (B, L, D). index: (B, L') slots of L to keep, -1 = pad slot. columns: (B, L).
        mask: (B, P + L), P cached columns first. rope: (R, B, L) or (B, L).

    The index is clamped and its pad slots found once for all four tensors (the same values as four
    `gather_reference` calls, in fewer host ops: this runs once per stage in the engine's hot path).
    """
    length = hidden.shape[1]
    pads = PadSlots(index, padded)
    safe = pads.safe
    # hidden's row index (B * L',) into (B * L, D): the (B, L) and (R, B, L) side tensors take it too (one row:
    # its slots, taken once for the four tensors)
    if safe.shape[0] == 1:
        flat = safe[0] if hidden.shape[0] == 1 else None
    else:
        flat = flat_rows(hidden, 1, safe) if hidden.is_contiguous() else None
    new_hidden = pads.fill_(take_rows(hidden, 1, safe, flat), 0)
    # the small side tensors of a host index of several rows: numpy takes at hidden's row index, their pads set in
    # the same array (~5-10 % less than a torch gather and fill each, warm); one row (no pads) and anything else (a
    # device index or tensor) take the torch gathers, lighter there
    host_flat = flat.numpy() if flat is not None and safe.shape[0] > 1 and numpy_viewable(flat) else None
    new_columns = None
    if columns is not None:
        taken = None if host_flat is None else _host_take(columns, host_flat, safe.shape, pads, -1)
        new_columns = taken if taken is not None else pads.fill_(take_rows(columns, 1, safe, flat), -1)
    new_mask = None
    if mask is not None:
        past = mask.shape[1] - length
        current = mask[:, past:] if past else mask
        taken = None if host_flat is None else _host_take(current, host_flat, safe.shape, pads, 0)
        current = taken if taken is not None else pads.fill_(take_rows(current, 1, safe, flat), 0)
        new_mask = torch.cat([mask[:, :past], current], dim=1) if past else current
    new_rope = None
    if rope is not None:
        taken = None if host_flat is None else _host_take(rope, host_flat, safe.shape, pads, 0)
        if taken is not None:
            new_rope = taken
        else:
            rows = rope.unsqueeze(0) if rope.ndim == 2 else rope
            new_rope = pads.fill_(_take_rope_rows(rows, safe, flat), 0, 1, 2)
            if rope.ndim == 2:
                new_rope = new_rope[0]
    return Compacted(new_hidden, new_columns, new_mask, new_rope)


_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.float32, torch.float64})  # fmt: skip


def numpy_viewable(x: torch.Tensor) -> bool:
    """Whether `x.numpy()` is a view of x: a plain CPU tensor (not a device stand-in: `engine/syncs.py`) of a numpy
    dtype, without grad. The host fast paths (here and in the adapters) take numpy only then, torch otherwise."""
    return type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and not x.requires_grad


def _host_take(
    x: torch.Tensor, flat: np.ndarray, shape: torch.Size, pads: PadSlots, value: float | int
) -> torch.Tensor | None:
    """x (..., B, L) at the (B * L',) row index `flat` of hidden (B, L) seen as rows (`flat_rows`), in numpy, with
    the pad slots set to `value`: (..., B, L') new and contiguous; None when numpy cannot view x (then torch)."""
    if not numpy_viewable(x) or x.ndim < 2:
        return None
    values = x.numpy()
    lead = values.shape[:-2]
    out = values.reshape(*lead, -1).take(flat, axis=-1).reshape(*lead, *shape)
    if pads.any:
        out[..., pads.host_pads] = value
    return torch.from_numpy(out)


def _take_rope_rows(rows: torch.Tensor, safe: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
    """(R, B, L) rotary positions at the (B, L') slots `safe` (no -1): `take_rows` for a batch axis that is not the
    first. A contiguous `rows` takes hidden's (B * L',) row index `flat` (`flat_rows`, the index that gathered the
    hidden states) with one `index_select`, 3-10x lighter on CPU than the broadcast gather used otherwise."""
    if safe.shape[0] == 1:  # (`flat`, given for one row, is safe[0])
        return rows.index_select(2, safe[0] if flat is None else flat)
    if flat is not None and rows.is_contiguous():
        return rows.reshape(rows.shape[0], -1).index_select(1, flat).view(rows.shape[0], *safe.shape)
    return rows.gather(2, safe.unsqueeze(0).expand(rows.shape[0], -1, -1)).contiguous()


def trim_reference(
    tensors: list[torch.Tensor],
    index: torch.Tensor,
    fill: float | int = 0,
    padded: bool | None = None,
    unread_pads: bool = False,
) -> list[torch.Tensor]:
    """Gather every (B, H, S, d) tensor (keys and values of each layer) down to (B, H, S', d) along S.

    The same values as `gather_reference(t, index, dim=2, fill)` for each tensor; the row index and the pad
    slots are found once per distinct (B, H, S) and device, not once per tensor. padded: whether `index` holds
    pad slots (-1), when the caller knows it on the host (False skips finding and filling them); None = find out.
    unread_pads: the caller never reads the pad slots (a cache's pad slots are masked in every later call): they
    hold the row's slot 0, not `fill` (a gather at the clamped index, without the fill: one op less per tensor,
    ~a third of a small trim's time on CPU)."""
    out, shared, on = [], {}, {}  # (on: the index on each device, moved once)
    for tensor in tensors:
        device = tensor.device
        idx = on.get(device)
        if idx is None:
            idx = on[device] = index.to(device)
        if tensor.ndim != 4 or not tensor.is_contiguous() or idx.shape[0] != tensor.shape[0]:
            safe = PadSlots(idx, padded).safe if unread_pads else idx  # (unread pads: slot 0, not filled)
            out.append(gather_reference(tensor, safe, dim=2, fill=fill, padded=False if unread_pads else padded))
            continue
        key = (tensor.shape[:3], device)
        if key not in shared:
            pads = PadSlots(idx, padded)
            # (one row: its slots, taken once for every tensor of the shape)
            shared[key] = (pads, flat_rows(tensor, 2, pads.safe) if pads.safe.shape[0] > 1 else pads.safe[0])
        pads, flat = shared[key]
        gathered = take_rows(tensor, 2, pads.safe, flat)
        out.append(gathered if unread_pads else pads.fill_(gathered, fill, 0, 2))
    return out

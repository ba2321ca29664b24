"""Position ids 0, 1, 2, ... as views of one expanded arange per shape family, shared by every forward.

A prefill needs the columns 0..L-1 of every row on the host (the mirror's first slot layout), the language model's
contiguous position ids on the device, and, for adapters whose rotary positions are the position ids
(`Adapter.rope_positions` not overridden) and a call without ids, the (R, B, L) rotary positions. Each is one
`narrow` of a buffer made once per (device, batch[, rows]) instead of an arange, an unsqueeze and an expand per
forward. The buffers are expanded (stride 0 over the batch) and never written: every consumer replaces them
(gathers, `apply`), none writes into them.
"""

from __future__ import annotations

import numpy as np
import torch

_MIN_WIDTH = 4096  # (positions a buffer holds at first; it doubles past the longest sequence seen)
_MAX_VIEWS = 64  # (prefill shapes whose views are kept)
_CPU = torch.device("cpu")


class SharedAranges:
    """Read-only views of expanded aranges, by (device, batch) and (device, batch, rows)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        # the views a prefill asks for (from position 0), by shape: the same every call of a signature, so one
        # dict lookup instead of a narrow (bounded: cleared past `_MAX_VIEWS` shapes)
        self._views: dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: tuple, end: int, device, leading: tuple[int, ...]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[-1] < end:
            buffer = torch.arange(max(2 * end, _MIN_WIDTH), device=device).expand(*leading, -1)
            self._buffers[key] = buffer
        return buffer

    def positions(self, start: int, length: int, batch: int, device) -> torch.Tensor:
        """(batch, length) start, start + 1, ... in every row (a view)."""
        if start == 0:
            view = self._views.get((length, batch, device))
            if view is not None:
                return view
        buffer = self._buffer((device, batch), start + length, device, (batch,))
        view = buffer.narrow(1, start, length)  # (one method call: lighter than a slicing __getitem__)
        if start == 0:
            self._keep((length, batch, device), view)
        return view

    def rope(self, length: int, batch: int, rows: int, device) -> torch.Tensor:
        """(rows, batch, length) 0, 1, ..., length - 1 in every row: an adapter's plain rotary positions (a view)."""
        view = self._views.get((length, batch, rows, device))
        if view is None:
            buffer = self._buffer((device, batch, rows), length, device, (rows, batch))
            view = buffer.narrow(2, 0, length)
            self._keep((length, batch, rows, device), view)
        return view

    def host_positions(self, length: int, batch: int) -> tuple[torch.Tensor, np.ndarray]:
        """(`positions(0, length, batch, cpu)`, its numpy view): a prefill's host columns, both kept per shape."""
        key = (length, batch, np.ndarray)
        pair = self._views.get(key)
        if pair is None:
            view = self.positions(0, length, batch, _CPU)
            array = view.numpy()
            array.flags.writeable = False  # (shared by every call of the shape: a stray write raises)
            pair = (view, array)
            self._keep(key, pair)
        return pair

    def all_true(self, batch: int, length: int) -> np.ndarray:
        """(batch, length) host bool, all set: the mask mirror of a call without a mask (read-only, shared)."""
        array = self._views.get((batch, length, bool))
        if array is None:
            array = np.ones((batch, length), dtype=bool)
            array.flags.writeable = False  # (the mirror replaces it, never writes it: a stray write raises)
            self._keep((batch, length, bool), array)
        return array

    def _keep(self, key: tuple, view: object) -> None:
        if len(self._views) >= _MAX_VIEWS:
            self._views.clear()
        self._views[key] = view

"""Position ids 0, 1, 2, ... as views of one expanded arange per shape family, shared by every forward.

A prefill needs the columns 0..L-1 of every row on the host (the mirror's first slot layout), the language model's
contiguous position ids on the device, and, for adapters whose rotary positions are the position ids
(`Adapter.rope_positions` not overridden) and a call without ids, the (R, B, L) rotary positions. Each is one
`narrow` of a buffer made once per (device, batch[, rows]) instead of an arange, an unsqueeze and an expand per
forward. The buffers are expanded (stride 0 over the batch) and never written: every consumer replaces them
(gathers, `apply`), none writes into them.
"""

from __future__ import annotations

import torch

_MIN_WIDTH = 4096  # (positions a buffer holds at first; it doubles past the longest sequence seen)


class SharedAranges:
    """Read-only views of expanded aranges, by (device, batch) and (device, batch, rows)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: tuple, end: int, device, leading: tuple[int, ...]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[-1] < end:
            buffer = torch.arange(max(2 * end, _MIN_WIDTH), device=device).expand(*leading, -1)
            self._buffers[key] = buffer
        return buffer

    def positions(self, start: int, length: int, batch: int, device) -> torch.Tensor:
        """(batch, length) start, start + 1, ... in every row (a view)."""
        buffer = self._buffer((device, batch), start + length, device, (batch,))
        return buffer.narrow(1, start, length)  # (one method call: lighter than a slicing __getitem__)

    def rope(self, length: int, batch: int, rows: int, device) -> torch.Tensor:
        """(rows, batch, length) 0, 1, ..., length - 1 in every row: an adapter's plain rotary positions (a view)."""
        buffer = self._buffer((device, batch, rows), length, device, (rows, batch))
        return buffer.narrow(2, 0, length)

"""The engine's host-side bookkeeping of one prefill, vectorised over the batch: shapes without device syncs.

Everything the engine needs in order to SHAPE tensors (how many visual tokens each row still holds, where they
sit, the left-padded compaction index) lives here as plain CPU tensors, built from two kinds of reads only:

* `read_call`: ONE packed device->host copy per prefill of the token ids, the 2-D mask and the small integer
  media metadata (grids, image sizes) the adapters read on the host;
* one copy per stage of the methods' keep masks (`HostBatch.apply`), concatenated over the batch.

Between those reads the state is advanced on the host with a constant number of batched torch ops per stage (no
Python loop over rows), and uploaded (`.to(device)`, host->device, no sync) where the device needs an index.

Flat arrays run over the batch's ORIGINAL visual tokens, row-major, ascending columns within a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_prune.engine.budget import tokens_to_keep

#: `HostBatch.within` entry of a segment whose slots are the current slots
SAME = "same"

#: integer call entries the adapters read on the host (besides the ids and the mask), copied with them
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "image_sizes", "batch_num_images", "image_num_patches")


def read_call(call: dict) -> dict[str, torch.Tensor]:
    """Host copies of the call's input ids, 2-D mask and integer media metadata, in ONE device->host copy.

    Returns {key: CPU tensor}; entries already on the CPU are returned as they are.
    """
    keys = [key for key in ("input_ids", "attention_mask", *HOST_KEYS) if _readable(call.get(key))]
    on_device = [key for key in keys if call[key].device.type != "cpu" or type(call[key]) is not torch.Tensor]
    host = {key: call[key] for key in keys if key not in on_device}
    if on_device:
        tensors = [call[key] for key in on_device]
        packed = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
        for key, tensor, part in zip(on_device, tensors, packed.split([t.numel() for t in tensors])):
            host[key] = part.view(tensor.shape).to(tensor.dtype)
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a sync: on CUDA a plain `.to()` from pageable memory waits for the
    stream, so the copy goes through pinned memory, non-blocking (the caching host allocator keeps the block
    until the copy is done)."""
    if tensor.device == device:
        return tensor
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def row_views(tensor: torch.Tensor, firsts: list[int] | None = None, counts: list[int] | None = None) -> list:
    """Per row of a (B, L, ...) tensor, `tensor[row, first:]` (given `firsts`) or `tensor[row, :count]` (given
    `counts`), as views from ONE unbind; a row is sliced only where it starts later or holds fewer than L."""
    rows = tensor.unbind(0)
    if firsts is not None:
        return [row if first == 0 else row[first:] for row, first in zip(rows, firsts)]
    width = tensor.shape[1]
    return [row if count == width else row[:count] for row, count in zip(rows, counts)]


def _readable(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()


@dataclass
class StageInput:
    """One stage's view of the batch (P = visual tokens present in the whole batch, row-major).

    present: (P,) flat indices of those tokens; rows, slots: (P,) their row and current slot;
    counts: N_r per row; starts: offset of row r in the P order; valid_counts: V_r non-padding slots per row;
    contiguous: whether row r's valid slots are its last V_r slots; padded: (2, B, N_max) long, the slots and the
    positions within the row's valid slots of its visual tokens, -1 padded (uploaded once);
    tokens_in: visual tokens per media item of each row.
    """

    present: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    counts: list[int]
    starts: list[int]
    valid_counts: list[int]
    contiguous: list[bool]
    padded: torch.Tensor
    tokens_in: list[list[int]]


class HostBatch:
    """Host mirror of one prefill's slots and visual tokens (see the module docstring).

    columns: (B, L) long, original column of every current slot (-1 = pad slot); valid: (B, L) bool, the mask of
    the current slots; flat arrays over the original visual tokens: rows, media_key (row * M + media item),
    kind, columns0 (original column), present (bool), slot (current slot, -1 when absent); num_media: media items
    per row.
    """

    def __init__(self, columns: torch.Tensor, valid: torch.Tensor, samples: list) -> None:
        self.columns, self.valid = columns, valid
        batch = len(samples)
        self.num_media = [sample.layout.num_media for sample in samples]
        self.width = max(self.num_media + [1])
        lengths = [len(sample.visual_columns) for sample in samples]
        if batch == 1:  # one row: no concatenation, no row keys
            self.rows = torch.zeros(lengths[0], dtype=torch.long)
        else:
            self.rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths, dtype=torch.long))
        if sum(lengths):
            def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
                return (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).long()

            media = joined([sample.layout.media_index for sample in samples])
            self.media_key = media if batch == 1 else self.rows * self.width + media
            self.kind = joined([sample.layout.kind for sample in samples])
            self.columns0 = joined([sample.visual_columns for sample in samples])
        else:
            self.media_key = self.kind = self.columns0 = torch.zeros(0, dtype=torch.long)
        self.slot = self.columns0.clone()  # the prefill starts with slot == column
        self.present = torch.ones(len(self.rows), dtype=torch.bool)
        self.all_present = True  # no stage removed a token yet: `present` is all set (skips its nonzero)
        self.checked = False  # the visual tokens were checked against the mask (first stage)
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.original_counts = self.media_counts(self.present)
        self.current_counts = self.original_counts  # tokens per media item still present (updated per stage)
        self.index_padded = False  # whether the last stage's compaction index has pad slots
        self._all_valid: bool | None = None  # `all_valid`, once known
        # per in-LLM segment (`mark_segment`): (B, L) the slot within the segment's slots of every current slot (-1 =
        # pad), `SAME` when no stage compacted since, None when unknown (a stage grew the sequence)
        self.within: list = []

    @property
    def all_valid(self) -> bool:
        """Whether no current slot is padding (asked once per slot layout)."""
        if self._all_valid is None:
            self._all_valid = bool(self.valid.all())
        return self._all_valid

    def row_presents(self) -> tuple[torch.Tensor, ...]:
        """Every row's `row_present` view, from one split."""
        return self.present.split([end - start for start, end in zip(self.offsets, self.offsets[1:])])

    def row_present(self, row: int) -> torch.Tensor:
        """(N0_r,) bool view of row `row`'s entries of `present` (writes go through)."""
        return self.present[self.offsets[row] : self.offsets[row + 1]]

    def media_counts(self, which: torch.Tensor) -> list[list[int]]:
        """Visual tokens per media item of every row among the flat tokens `which` (bool mask or indices)."""
        keys = self.media_key[which]
        table = torch.bincount(keys, minlength=len(self.num_media) * self.width).view(-1, self.width).tolist()
        return [counts[:items] for counts, items in zip(table, self.num_media)]

    # ------------------------------------------------------------------ per stage
    def stage_input(self) -> StageInput:
        batch, length = self.columns.shape
        if self.all_present:
            present, rows, slots = torch.arange(len(self.rows)), self.rows, self.slot
        else:
            present = self.present.nonzero(as_tuple=True)[0]
            rows, slots = self.rows[present], self.slot[present]
        tokens_in = self.current_counts
        counts = [sum(row) for row in tokens_in]
        starts = [0]
        for count in counts[:-1]:
            starts.append(starts[-1] + count)
        if self.all_valid:  # no padding slot: a slot is its own rank among the valid ones
            self.checked = True
            valid_counts, contiguous = [length] * batch, [True] * batch
            if batch == 1:
                padded = torch.stack([slots, slots]).unsqueeze(1)
                return StageInput(present, rows, slots, counts, starts, valid_counts, contiguous, padded, tokens_in)
            rank = None
        else:
            valid_counts = self.valid.sum(dim=1)
            rank = torch.cumsum(self.valid, dim=1) - 1
            first = torch.where(valid_counts > 0, self.valid.int().argmax(dim=1), torch.full_like(valid_counts, length))
            host = torch.stack([valid_counts, first == length - valid_counts]).tolist()  # one conversion
            valid_counts, contiguous = host[0], [bool(flag) for flag in host[1]]
        width = max(counts) if batch else 0
        padded = torch.full((2, batch, width), -1, dtype=torch.long)
        position = torch.arange(len(present)) - torch.tensor(starts, dtype=torch.long)[rows]
        padded[0, rows, position] = slots
        padded[1, rows, position] = slots if rank is None else rank[rows, slots]
        if not self.checked:
            self.checked = True
            if len(slots) and not bool(self.valid[rows, slots].all()):
                from vlm_prune.errors import InputError

                raise InputError("visual tokens are masked out by the attention mask; check the inputs")
        return StageInput(present, rows, slots, counts, starts, valid_counts, contiguous, padded, tokens_in)

    def budgets(self, keep, tokens_in: list[list[int]]) -> list[list[int] | None]:
        """Tokens to keep per media item of every row (None rows: the method decides)."""
        if keep is None:
            return [None] * len(tokens_in)
        return [
            [tokens_to_keep(keep, o, c) for o, c in zip(original, current)]
            for original, current in zip(self.original_counts, tokens_in)
        ]

    def apply(self, plan: StageInput, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance the mirror past a stage that kept the flat tokens where `keep` (P,) bool (host) is set.

        Returns (index (B, L') long: the slot of L for each new slot, rows left-padded with -1; removed (B, L)
        bool: the slots removed; new_slot (K,) long: the new slot of each kept visual token, row-major).
        """
        batch, length = self.columns.shape
        dropped = ~keep
        if not bool(dropped.any()):  # the stage kept everything: the slots stay as they are
            identity = torch.arange(length).expand(batch, -1)
            self.index_padded = False
            return identity, torch.zeros(batch, length, dtype=torch.bool), plan.slots
        removed = torch.zeros(batch, length, dtype=torch.bool)
        removed[plan.rows[dropped], plan.slots[dropped]] = True
        self.present[plan.present[dropped]] = False
        self.all_present = False
        self.current_counts = self.media_counts(plan.present[keep])
        kept = ~removed
        kept_counts = kept.sum(dim=1)
        lengths = kept_counts.tolist()
        width = max(lengths) if batch else 0
        self.index_padded = min(lengths, default=width) < width  # the index has pad slots (-1): ragged rows
        target = torch.cumsum(kept, dim=1) - 1
        if self.index_padded:
            target = target + (width - kept_counts).view(-1, 1)
        row_index, slot_index = kept.nonzero(as_tuple=True)
        new_slot = target[plan.rows[keep], plan.slots[keep]]
        self.slot[plan.present[keep]] = new_slot
        self.slot[plan.present[dropped]] = -1
        if not self.index_padded:  # every row keeps `width` slots: the kept slots, row by row, are the index
            index = slot_index.view(batch, width)
            self.columns, self.valid = self.columns.gather(1, index), self.valid.gather(1, index)
            self._all_valid = True if self._all_valid else None  # dropping slots never adds padding
            self.within = [index if w is SAME else None if w is None else w.gather(1, index) for w in self.within]
            return index, removed, new_slot
        index = torch.full((batch, width), -1, dtype=torch.long)
        index[row_index, target[row_index, slot_index]] = slot_index
        real = index >= 0
        safe = index.clamp(min=0)
        self.columns = torch.where(real, self.columns.gather(1, safe), torch.full_like(index, -1))
        self.valid = real & self.valid.gather(1, safe)
        self._all_valid = False  # the rows are left-padded
        pad = torch.full_like(index, -1)
        self.within = [index if w is SAME else None if w is None else torch.where(real, w.gather(1, safe), pad)
                       for w in self.within]
        return index, removed, new_slot

    def mark_segment(self) -> None:
        """A new in-LLM segment starts at the current slots (see `within`)."""
        self.within.append(SAME)

    def refresh(self, columns: torch.Tensor, valid: torch.Tensor) -> None:
        """Take a new slot layout read from the device (after a stage that grows the sequence, `reentry`)."""
        self.columns, self.valid = columns, valid
        self._all_valid = None
        self.within = [None] * len(self.within)  # the segments' slots no longer map by composition
        batch = columns.shape[0]
        width = max(int(columns.max()) if columns.numel() else 0, int(self.columns0.max()) if len(self.rows) else 0)
        slot_of = torch.full((batch, width + 1), -1, dtype=torch.long)
        row_index, slot_index = (columns >= 0).nonzero(as_tuple=True)
        slot_of[row_index, columns[row_index, slot_index]] = slot_index
        self.slot = torch.where(self.present, slot_of[self.rows, self.columns0], torch.full_like(self.columns0, -1))
        self.all_present = bool(self.present.all())
        self.current_counts = self.media_counts(self.present)

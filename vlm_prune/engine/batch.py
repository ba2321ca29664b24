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
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
        self.rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths, dtype=torch.long))
        if sum(lengths):
            media = torch.cat([sample.layout.media_index for sample in samples]).long()
            self.media_key = self.rows * self.width + media
            self.kind = torch.cat([sample.layout.kind for sample in samples])
            self.columns0 = torch.cat([sample.visual_columns for sample in samples]).long()
        else:
            self.media_key = self.kind = self.columns0 = torch.zeros(0, dtype=torch.long)
        self.slot = self.columns0.clone()  # the prefill starts with slot == column
        self.present = torch.ones(len(self.rows), dtype=torch.bool)
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.original_counts = self.media_counts(self.present)

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
        present = self.present.nonzero(as_tuple=True)[0]
        rows, slots = self.rows[present], self.slot[present]
        counts = torch.bincount(rows, minlength=batch)
        starts = torch.cumsum(counts, 0) - counts
        valid_counts = self.valid.sum(dim=1)
        rank = torch.cumsum(self.valid, dim=1) - 1
        first = torch.where(valid_counts > 0, self.valid.int().argmax(dim=1), torch.full_like(valid_counts, length))
        width = int(counts.max()) if batch else 0
        padded = torch.full((2, batch, width), -1, dtype=torch.long)
        position = torch.arange(len(present)) - starts[rows]
        padded[0, rows, position] = slots
        padded[1, rows, position] = rank[rows, slots]
        if len(slots) and not bool(self.valid[rows, slots].all()):
            from vlm_prune.errors import InputError

            raise InputError("visual tokens are masked out by the attention mask; check the inputs")
        return StageInput(
            present=present,
            rows=rows,
            slots=slots,
            counts=counts.tolist(),
            starts=starts.tolist(),
            valid_counts=valid_counts.tolist(),
            contiguous=(first == length - valid_counts).tolist(),
            padded=padded,
            tokens_in=self.media_counts(present),
        )

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
        removed = torch.zeros(batch, length, dtype=torch.bool)
        removed[plan.rows[dropped], plan.slots[dropped]] = True
        self.present[plan.present[dropped]] = False
        kept = ~removed
        kept_counts = kept.sum(dim=1)
        width = int(kept_counts.max()) if batch else 0
        target = torch.cumsum(kept, dim=1) - 1 + (width - kept_counts).view(-1, 1)
        row_index, slot_index = kept.nonzero(as_tuple=True)
        new_positions = target[row_index, slot_index]
        index = torch.full((batch, width), -1, dtype=torch.long)
        index[row_index, new_positions] = slot_index
        new_slot = target[plan.rows[keep], plan.slots[keep]]
        self.slot[plan.present[keep]] = new_slot
        self.slot[plan.present[dropped]] = -1
        real = index >= 0
        safe = index.clamp(min=0)
        self.columns = torch.where(real, self.columns.gather(1, safe), torch.full_like(index, -1))
        self.valid = real & self.valid.gather(1, safe)
        return index, removed, new_slot

    def refresh(self, columns: torch.Tensor, valid: torch.Tensor) -> None:
        """Take a new slot layout read from the device (after a stage that grows the sequence, `reentry`)."""
        self.columns, self.valid = columns, valid
        batch = columns.shape[0]
        width = max(int(columns.max()) if columns.numel() else 0, int(self.columns0.max()) if len(self.rows) else 0)
        slot_of = torch.full((batch, width + 1), -1, dtype=torch.long)
        row_index, slot_index = (columns >= 0).nonzero(as_tuple=True)
        slot_of[row_index, columns[row_index, slot_index]] = slot_index
        self.slot = torch.where(self.present, slot_of[self.rows, self.columns0], torch.full_like(self.columns0, -1))

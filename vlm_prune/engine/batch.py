"""The engine's host-side bookkeeping of one prefill, vectorised over the batch: shapes without device syncs.

Everything the engine needs in order to SHAPE tensors (how many visual tokens each row still holds, where they
sit, the left-padded compaction index) lives here as plain CPU tensors, built from two kinds of reads only:

* `read_call`: ONE packed device->host copy per prefill of the token ids, the 2-D mask and the small integer
  media metadata (grids, image sizes) the adapters read on the host;
* one copy per stage of the methods' keep masks (`HostBatch.apply`), concatenated over the batch.

Between those reads the state is advanced on the host with a constant number of batched numpy ops per stage (no
Python loop over rows; numpy, not torch: ~1 us a call on these small arrays against 3-20 us), and uploaded
(`.to(device)`, host->device, no sync) where the device needs an index.

Flat arrays run over the batch's ORIGINAL visual tokens, row-major, ascending columns within a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate

import numpy as np
import torch

from vlm_prune.engine.budget import tokens_to_keep
from vlm_prune.engine.records import fresh

#: `HostBatch.within` entry of a segment whose slots are the current slots
SAME = "same"

#: integer call entries the adapters read on the host (besides the ids and the mask), copied with them
HOST_KEYS = ("image_grid_thw", "video_grid_thw", "image_sizes", "batch_num_images", "image_num_patches")


def read_call(call: dict) -> dict[str, torch.Tensor]:
    """Host copies of the call's input ids, 2-D mask and integer media metadata, in ONE device->host copy.

    Returns {key: CPU tensor}; entries already on the CPU are returned as they are.
    """
    host, on_device = {}, []
    for key in _READ_KEYS:  # (one pass: most of the keys are absent from a call)
        value = call.get(key)
        if value is not None and _readable(value):
            if type(value) is torch.Tensor and value.is_cpu:
                host[key] = value
            else:
                on_device.append(key)
    if on_device:
        tensors = [call[key] for key in on_device]
        packed = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
        for key, tensor, part in zip(on_device, tensors, packed.split([t.numel() for t in tensors])):
            host[key] = part.view(tensor.shape).to(tensor.dtype)
    return host


_READ_KEYS = ("input_ids", "attention_mask", *HOST_KEYS)


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
    """An integer (or bool) tensor. (The dtype's attributes: lighter than the tensor's two predicate methods.)"""
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and not value.dtype.is_complex


@dataclass
class StageInput:
    """One stage's view of the batch (P = visual tokens present in the whole batch, row-major).

    present: (P,) flat indices of those tokens; rows, slots: (P,) their row and current slot (numpy int64);
    counts: N_r per row; starts: offset of row r in the P order; valid_counts: V_r non-padding slots per row;
    contiguous: whether row r's valid slots are its last V_r slots; padded: (2, B, N_max) long tensor, the slots
    and the positions within the row's valid slots of its visual tokens, -1 padded (made on first read: with `runs`
    and no method asking for `ctx.visual_index`, never);
    tokens_in: visual tokens per media item of each row; runs: the first slot of every row's visual tokens when
    each row's tokens fill one run of consecutive slots (the usual single-image row), else None (then the
    engine gathers them; with runs it takes views); flat: (P,) row * L + slot of each token.
    """

    present: np.ndarray
    rows: np.ndarray
    slots: np.ndarray
    counts: list[int]
    starts: list[int]
    valid_counts: list[int]
    contiguous: list[bool]
    make_padded: Callable[[], torch.Tensor]
    tokens_in: list[list[int]]
    runs: list[int] | None
    flat: np.ndarray
    _padded: torch.Tensor | None = None

    @property
    def padded(self) -> torch.Tensor:
        if self._padded is None:
            self._padded = self.make_padded()
        return self._padded


def padded_places(rows: np.ndarray, starts: list[int], width: int) -> np.ndarray:
    """(P,) where each of P row-major tokens goes in a row-padded (B * width) array: row * width + its place in
    its row (`starts`: where each row begins in the P order)."""
    return rows * width + (np.arange(len(rows)) - np.asarray(starts, dtype=np.int64)[rows])


def _runs(slots: np.ndarray, counts: list[int], starts: list[int]) -> list[int] | None:
    """The first slot of every row's visual tokens if each row's N_r tokens sit in N_r consecutive slots, else None
    (rows without visual tokens get 0). slots: (P,) row-major; within a row they ascend strictly (every stage keeps
    a row in original column order, and re-entry rebuilds it so), so first and last decide."""
    firsts = []
    for start, count in zip(starts, counts):
        if count == 0:
            firsts.append(0)
            continue
        first = int(slots[start])
        if int(slots[start + count - 1]) - first != count - 1:
            return None
        firsts.append(first)
    return firsts


def _valid_runs(valid: np.ndarray) -> tuple[list[int], list[int]]:
    """(valid slots per row, each row's first valid slot (L for a row without one)) of the (B, L) bool mask.

    (One nonzero, divmod and bincount: the paths the media search (`HostMedia`) has just taken, so warm in the
    hooks, where a reduction over an axis, an argmax and a `where` each cost 10-30 us cold.)"""
    batch, length = valid.shape
    rows, columns = np.divmod(valid.ravel().nonzero()[0], length)
    counts = np.bincount(rows, minlength=batch).tolist()
    firsts, start = [], 0
    for count in counts:
        firsts.append(int(columns[start]) if count else length)
        start += count
    return counts, firsts


def filled(shape, value, dtype) -> np.ndarray:
    """np.full without its Python wrapper (np.full / np.ones cost ~2x an empty + fill on these small arrays)."""
    array = np.empty(shape, dtype=dtype)
    array.fill(value)
    return array


def _once(make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """`make()` computed on the first call, then returned (functools.cache builds an lru wrapper: ~5x the cost)."""
    made: list = []

    def get() -> np.ndarray:
        if not made:
            made.append(make())
        return made[0]

    return get


def _numpy(tensor) -> np.ndarray:
    return tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


@dataclass(frozen=True)
class MediaTemplate:
    """What the host mirror takes from a batch's layouts alone, not from its columns (read-only, shared).

    num_media: media items per row; width: the most items of a row (at least 1); rows, media_key (row * width +
    item), kind: (P0,) int64 over the batch's visual tokens, row-major; offsets: (B + 1) where each row's tokens
    start; original_counts: visual tokens per media item of every row.
    """

    num_media: list[int]
    width: int
    rows: np.ndarray
    media_key: np.ndarray
    kind: np.ndarray
    offsets: list[int]
    original_counts: list[list[int]]
    #: (P0,) 0, 1, ..., P0 - 1: the flat indices of every visual token (the first stage's `present`)
    every: np.ndarray
    #: the first stage's budgets per keep setting (`HostBatch.budgets`), filled on use: a pure function of the keep
    #: and the original counts (read-only lists)
    first_budgets: dict = field(default_factory=dict, compare=False)


def _joined(tensors: list[torch.Tensor]) -> np.ndarray:
    """The tensors' values, concatenated as one int64 array (rows of one cached layout share a tensor: each
    distinct tensor is converted once)."""
    arrays: dict[int, np.ndarray] = {}
    parts = []
    for tensor in tensors:
        part = arrays.get(id(tensor))
        if part is None:
            part = arrays[id(tensor)] = _numpy(tensor)
        parts.append(part)
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int64, copy=False)


def _counts_per_item(media_key: np.ndarray, num_media: list[int], width: int) -> list[list[int]]:
    """Tokens per media item of every row, from the (K,) `row * width + item` keys of K tokens."""
    table = np.bincount(media_key, minlength=len(num_media) * width).reshape(-1, width).tolist()
    return [counts[:items] for counts, items in zip(table, num_media)]


def _build_template(samples: list) -> MediaTemplate:
    batch = len(samples)
    num_media = [sample.layout.num_media for sample in samples]
    width = max(num_media + [1])
    lengths = [sample.visual_columns.shape[0] for sample in samples]
    rows = np.zeros(lengths[0], dtype=np.int64) if batch == 1 else np.repeat(np.arange(batch), lengths)
    if sum(lengths):
        media = _joined([sample.layout.media_index for sample in samples])
        media_key = media if batch == 1 else rows * width + media
        kind = _joined([sample.layout.kind for sample in samples])
    else:
        media_key = kind = np.zeros(0, dtype=np.int64)
    offsets = list(accumulate(lengths, initial=0))
    original_counts = _counts_per_item(media_key, num_media, width)
    every = np.arange(len(rows))
    for array in (rows, media_key, kind, every):  # shared by every call of the signature: a stray write raises
        array.flags.writeable = False
    return MediaTemplate(num_media, width, rows, media_key, kind, offsets, original_counts, every)


def media_template(samples: list) -> tuple[MediaTemplate, np.ndarray]:
    """(the batch's `MediaTemplate`, (P0,) int64 original columns of its visual tokens, row-major).

    Samples an adapter planned (`adapters/media_plan.PlannedSamples`) carry their plan and their flat columns: the
    template is then built once per plan (a batch signature) and the columns are not re-joined."""
    plan = getattr(samples, "plan", None)
    if plan is None:
        template = _build_template(samples)
        columns = _joined([sample.visual_columns for sample in samples]) if len(template.rows) else template.rows
        return template, columns
    template = plan.derived.get(MediaTemplate)
    if template is None:
        template = plan.derived[MediaTemplate] = _build_template(samples)
    return template, samples.columns


def _new_slots(source: np.ndarray, plan: StageInput, keep: np.ndarray, batch: int, width: int,
               row_shift: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """The new slot of every kept visual token after a stage, row-major ((K,) int64): a kept slot's place in
    `source` (the kept flat slots) less its row's start there, plus the row's left padding (`row_shift`, or None
    when every row keeps `width` slots)."""
    position = source.searchsorted(plan.flat[keep])
    if batch == 1:  # one row, no left padding: a kept slot's place in `source` is its new slot
        return position
    if row_shift is None:  # every row keeps `width` slots: row r's start in `source` is r * width
        return position % width
    return position - row_shift[plan.rows[keep]]


def _advance_slots(previous: np.ndarray | None, gone: np.ndarray | None, kept_tokens: np.ndarray,
                   new_slot: Callable[[], np.ndarray], count: int) -> np.ndarray:  # fmt: skip
    """The mirror's `slot` after a stage: -1 for the tokens it removed (all absent ones, at the first stage, where
    `previous` is None and `kept_tokens` masks all `count`), the new slot for those it kept. A new array."""
    if previous is None:
        slot = filled(count, -1, np.int64)
    else:
        slot = previous.copy()
        slot[gone] = -1
    slot[kept_tokens] = new_slot()
    return slot


class HostBatch:
    """Host mirror of one prefill's slots and visual tokens (see the module docstring).

    columns: (B, L) long, original column of every current slot (-1 = pad slot); valid: (B, L) bool, the mask of
    the current slots; flat arrays over the original visual tokens: rows, media_key (row * M + media item),
    kind, columns0 (original column), slot (current slot, -1 when absent) as numpy int64 arrays, and present
    ((P0,) bool tensor; its numpy view shares the memory); num_media: media items per row.

    The state is kept in numpy arrays: the small host-side index arithmetic costs ~1 us per numpy call against
    3-20 us per torch call on a CPU (advanced indexing, nonzero, tolist); `columns`, `valid`, `within` and
    the indices `apply` returns are torch views of the same memory (`torch.from_numpy`, no copy).
    """

    def __init__(
        self, columns: torch.Tensor, valid: torch.Tensor | np.ndarray, samples: list, columns_are_slots: bool = False,
        arrays: tuple[np.ndarray, bool] | None = None,
    ) -> None:
        """columns_are_slots: every row's columns are 0..L-1 (a prefill's own slots: the first compaction's columns
        are then its index, no gather); arrays: (the numpy view of `columns`, whether every slot is valid), when the
        caller has them (`valid` is then a numpy array)."""
        if arrays is None:
            self._columns, self._valid = _numpy(columns), _numpy(valid)
        else:
            self._columns, self._valid = arrays[0], valid
        self._columns_are_slots = columns_are_slots
        #: (B, L) long torch view of `_columns` (replaced with it, never written)
        self.columns = columns if isinstance(columns, torch.Tensor) else torch.from_numpy(self._columns)
        self._valid_view = valid if isinstance(valid, torch.Tensor) else None  # `valid`, made on first use
        template, self.columns0 = media_template(samples)
        self.num_media, self.width, self.rows = template.num_media, template.width, template.rows
        self.media_key, self.kind, self.offsets = template.media_key, template.kind, template.offsets
        self._every = template.every
        self._slot, self._slot_todo = self.columns0, None  # the prefill starts with slot == column (`slot`)
        # (P0,) bool, every visual token still present, and its torch view (the same memory: writes show in
        # `present` and its row views), made on first use (`present`): before a stage removed one, all True
        self._present: np.ndarray | None = None
        self._present_view: torch.Tensor | None = None
        self.all_present = True  # no stage removed a token yet: `present` is all set (skips its nonzero)
        self.checked = False  # the visual tokens were checked against the mask (first stage)
        self.original_counts = template.original_counts
        self._first_budgets = template.first_budgets  # (shared by the signature's calls: read-only lists)
        self.current_counts = self.original_counts  # tokens per media item still present (updated per stage)
        self.index_padded = False  # whether the last stage's compaction index has pad slots
        self.has_pad_slots: bool | None = False  # whether any current slot is a pad slot (-1 column); None: unknown
        self._all_valid: bool | None = None if arrays is None else arrays[1]  # `all_valid`, once known
        # per in-LLM segment (`mark_segment`): (B, L) the slot within the segment's slots of every current slot (-1 =
        # pad), `SAME` when no stage compacted since, None when unknown (a stage grew the sequence)
        self._within: list = []
        self._index: np.ndarray | None = None  # the last stage's compaction index (numpy), when it removed tokens
        self._unread: tuple | None = None  # (an index, it with its pad slots at slot 0): `without_pads`' memo
        # per stage that ran: (keep (P,) host bool over its tokens, row starts and counts in them, kept per row); the
        # samples apply their rows' parts to their layouts on read (`forward_state._Sample.layout`)
        self.stage_keeps: list[tuple] = []

    # ---- torch views of the numpy state (`columns` with every change, `valid` on first use after one)
    @property
    def valid(self) -> torch.Tensor:
        if self._valid_view is None:  # (a shared read-only mirror, `SharedAranges.all_true`, is copied first)
            valid = self._valid if self._valid.flags.writeable else self._valid.copy()
            self._valid_view = torch.from_numpy(valid)
        return self._valid_view

    @property
    def within(self) -> list:
        return [w if w is SAME or w is None else torch.from_numpy(w) for w in self._within]

    @property
    def within_unread(self) -> list:
        """`within` with pad slots at slot 0, for the cache trim (a cache's pad slots are never read); `within`
        itself when no current slot is a pad slot (then no segment's index has one: nothing to clamp)."""
        if self.has_pad_slots is False:
            return self.within
        return [w if w is SAME or w is None else self.without_pads(w) for w in self._within]

    def gather_index(self, index: torch.Tensor) -> torch.Tensor:
        """The last stage's compaction `index` (B, L') on its device, its pad slots at slot 0, for gathers whose
        pad slots are never read (the rotary cos and sin): gathered with `padded=False`, no pad search or fill."""
        if not self.index_padded:
            return index
        return to_device(self.without_pads(self._index), index.device)

    def without_pads(self, index: np.ndarray) -> torch.Tensor:
        """(B, L') `index` with its pad slots (-1) at slot 0; the last array asked is remembered (the last stage's
        index serves the rotary gather and the cache trim of the segment it closes)."""
        memo = self._unread
        if memo is None or memo[0] is not index:
            memo = self._unread = (index, torch.from_numpy(np.maximum(index, 0)))
        return memo[1]

    def _set_slots(self, columns: np.ndarray, valid: np.ndarray) -> None:
        self._columns, self._valid, self._valid_view = columns, valid, None
        self.columns = torch.from_numpy(columns)

    @property
    def all_valid(self) -> bool:
        """Whether no current slot is padding (asked once per slot layout)."""
        if self._all_valid is None:
            self._all_valid = np.count_nonzero(self._valid) == self._valid.size  # (lighter than .all())
        return self._all_valid

    @property
    def present(self) -> torch.Tensor:
        """(P0,) bool torch view of the visual tokens still present (writes go through)."""
        if self._present_view is None:
            if self._present is None:
                self._present = filled(len(self.rows), True, bool)
            self._present_view = torch.from_numpy(self._present)
        return self._present_view

    @property
    def slot(self) -> np.ndarray:
        """(P0,) int64 current slot of every original visual token, -1 when absent (replaced, never written)."""
        if self._slot_todo is not None:  # (the last stage's, made on first read: one stage never reads it)
            todo, self._slot_todo = self._slot_todo, None
            self._slot = todo()
        return self._slot

    @slot.setter
    def slot(self, value: np.ndarray) -> None:
        self._slot, self._slot_todo = value, None

    def row_present(self, row: int) -> torch.Tensor:
        """(N0_r,) bool view of row `row`'s entries of `present` (writes go through)."""
        return self.present[self.offsets[row] : self.offsets[row + 1]]

    def media_counts(self, which) -> list[list[int]]:
        """Visual tokens per media item of every row among the flat tokens `which` (bool mask or indices)."""
        keys = self.media_key[_numpy(which) if isinstance(which, torch.Tensor) else which]
        return _counts_per_item(keys, self.num_media, self.width)

    # ------------------------------------------------------------------ per stage
    def stage_input(self) -> StageInput:
        batch, length = self._columns.shape
        if self.all_present:
            present, rows, slots = self._every, self.rows, self.slot
        else:
            present = self._present.nonzero()[0]
            rows, slots = self.rows[present], self.slot[present]
        tokens_in = self.current_counts
        counts = [sum(row) for row in tokens_in]
        starts = list(accumulate(counts[:-1], initial=0))
        runs = _runs(slots, counts, starts)
        # flat indices (row * L + slot): 1-D fancy indexing is ~3x cheaper than (row, slot) pairs
        flat = slots if batch == 1 else rows * length + slots
        if self.all_valid:  # no padding slot: a slot is its own rank among the valid ones
            self.checked = True
            valid_counts, contiguous, first = [length] * batch, [True] * batch, None
        else:
            valid_counts, first = _valid_runs(self._valid)
            # the row's valid slots are its last ones (left padding)
            contiguous = [start == length - count for start, count in zip(first, valid_counts)]
            if not self.checked:
                self.checked = True
                if len(slots) and np.count_nonzero(self._valid.reshape(-1)[flat]) != len(slots):
                    from vlm_prune.errors import InputError

                    raise InputError("visual tokens are masked out by the attention mask; check the inputs")
        valid, first = (None, None) if self.all_valid else (self._valid, first)

        def make_padded() -> torch.Tensor:
            if valid is None:  # no padding slot: a slot is its own rank among the valid ones
                rank = slots
            elif all(contiguous):  # a slot's rank among its row's valid slots: slot - first (left padding)
                rank = slots - np.asarray(first, dtype=np.int64)[rows]
            else:
                rank = (np.cumsum(valid, axis=1) - 1).reshape(-1)[flat]
            width = max(counts) if batch else 0
            if min(counts, default=0) == width:  # every row holds `width` tokens: no pad entry, no scatter
                return torch.from_numpy(np.concatenate([slots, rank]).reshape(2, batch, width))
            dest = padded_places(rows, starts, width)
            padded = filled((2, batch * width), -1, np.int64)
            padded[0][dest] = slots
            padded[1][dest] = rank
            return torch.from_numpy(padded.reshape(2, batch, width))

        return fresh(StageInput, {"present": present, "rows": rows, "slots": slots, "counts": counts, "starts": starts,
                                  "valid_counts": valid_counts, "contiguous": contiguous, "make_padded": make_padded,
                                  "tokens_in": tokens_in, "runs": runs, "flat": flat, "_padded": None})  # fmt: skip

    def padded_media(self, plan: StageInput) -> np.ndarray:
        """(B, N_max) int64: the media item (in its row) of every visual token of `plan`, placed as in
        `plan.padded`, -1 at pad entries."""
        batch, width = len(plan.counts), max(plan.counts, default=0)
        keys = self.media_key[plan.present]
        items = keys if batch == 1 else keys - plan.rows * self.width
        if min(plan.counts, default=0) == width:
            return items.reshape(batch, width)
        out = filled(batch * width, -1, np.int64)
        out[padded_places(plan.rows, plan.starts, width)] = items
        return out.reshape(batch, width)

    def budgets(self, keep, tokens_in: list[list[int]]) -> list[list[int] | None]:
        """Tokens to keep per media item of every row (None rows: the method decides). Before any stage removed a
        token they are a function of the media template and the keep alone: computed once per (template, keep)."""
        if keep is None:
            return [None] * len(tokens_in)
        first = tokens_in is self.original_counts
        if first:
            found = self._first_budgets.get((type(keep), keep))
            if found is not None:
                return found
        known: dict[tuple, list[int]] = {}  # rows with the same counts share one (read-only) list
        budgets = []
        for original, current in zip(self.original_counts, tokens_in):
            key = (*original, -1, *current)
            row = known.get(key)
            if row is None:
                row = known[key] = [tokens_to_keep(keep, o, c) for o, c in zip(original, current)]
            budgets.append(row)
        if first:
            self._first_budgets[(type(keep), keep)] = budgets
        return budgets

    def apply(
        self, plan: StageInput, keep: torch.Tensor, removed: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Callable[[], np.ndarray]]:
        """Advance the mirror past a stage that kept the flat tokens where `keep` (P,) bool (host) is set.

        Returns (index (B, L') long: the slot of L for each new slot, rows left-padded with -1; removed (B, L)
        bool: the slots removed, or None when not asked for), tensors, both None when the stage kept everything
        (the slots stay as they are), and new_slot: a function giving the (K,) int64 numpy new slot of each kept
        visual token, row-major (computed on first call: only merging methods ask).
        """
        batch, length = self._columns.shape
        keep = _numpy(keep)
        total_kept = int(np.count_nonzero(keep))  # (numpy 2 returns an np.int64: the counts are plain ints)
        if total_kept == len(keep):  # the stage kept everything: the slots stay as they are
            self.index_padded = False
            return None, None, lambda: plan.slots
        kept = filled(batch * length, True, bool)  # (B * L) the slots that stay
        kept[plan.flat] = keep  # (the other slots hold no visual token: they stay)
        first_stage = self.all_present  # the plan holds every token: `keep` is a mask over all of them
        gone = None
        if first_stage:
            if self._present is None:  # (nobody read `present` yet: a new array, no views to keep in step)
                self._present = keep.copy()
            else:
                self._present[...] = keep  # (in place: `present` and its row views share the memory)
            kept_tokens = keep
        else:
            gone = plan.present[~keep]
            self._present[gone] = False
            kept_tokens = plan.present[keep]
        self.all_present = False
        # (one row of one media item, the usual single-image prompt: its count is the total, no bincount)
        self.current_counts = [[total_kept]] if self.width == 1 and batch == 1 else self.media_counts(kept_tokens)
        # slots left per row: only visual tokens are removed
        lengths = [length - count + sum(now) for count, now in zip(plan.counts, self.current_counts)]
        width = max(lengths) if batch else 0
        self.index_padded = min(lengths, default=width) < width  # the index has pad slots (-1): ragged rows
        if self.index_padded:  # (pad slots stay: a stage removes visual tokens only)
            self.has_pad_slots = True
        source = kept.nonzero()[0]  # (K,) flat (row * L + slot) of every kept slot, row-major
        row_shift = None
        if self.index_padded:  # row r's start in `source`, less its left padding in the new layout
            row_shift = np.asarray(list(accumulate(lengths[:-1], initial=0)), dtype=np.int64)
            row_shift -= width - np.asarray(lengths, dtype=np.int64)
        new_slot = _once(partial(_new_slots, source, plan, keep, batch, width, row_shift))  # (made on first call)
        previous = None if first_stage else self.slot
        self._slot_todo = partial(_advance_slots, previous, gone, kept_tokens, new_slot, len(keep))
        slots_known = self._columns_are_slots
        self._columns_are_slots = False
        if not self.index_padded:  # every row keeps `width` slots: the kept slots, row by row, are the index
            index = source.reshape(batch, width)
            if batch > 1:
                index = index % length  # (row r's entries lie in [r * L, (r + 1) * L))
            columns = index if slots_known else self._columns.take(source).reshape(batch, width)
            self._set_slots(columns, self._valid.take(source).reshape(batch, width))
            self._all_valid = True if self._all_valid else None  # dropping slots never adds padding
            self._within = [index if w is SAME else None if w is None else w.take(source).reshape(batch, width)
                            for w in self._within]
        else:
            row_index = source // length
            slot_index = source - row_index * length
            dest = np.arange(len(source)) + (row_index * width - row_shift[row_index])  # (K,) flat new slot in (B, L')

            def scatter(values: np.ndarray, fill) -> np.ndarray:
                out = filled(batch * width, fill, values.dtype)
                out[dest] = values
                return out.reshape(batch, width)

            index = self._index = scatter(slot_index, -1)
            columns = index if slots_known else scatter(self._columns.take(source), -1)
            self._set_slots(columns, scatter(self._valid.take(source), False))
            self._all_valid = False  # the rows are left-padded
            self._within = [index if w is SAME else None if w is None else scatter(w.take(source), -1)
                            for w in self._within]
        gone_slots = torch.from_numpy(~kept.reshape(batch, length)) if removed else None
        return self.columns if columns is index else torch.from_numpy(index), gone_slots, new_slot

    def mark_segment(self) -> None:
        """A new in-LLM segment starts at the current slots (see `within`)."""
        self._within.append(SAME)

    def refresh(self, columns: torch.Tensor, valid: torch.Tensor) -> None:
        """Take a new slot layout read from the device (after a stage that grows the sequence, `reentry`)."""
        self._columns, self._valid, self.columns, self._valid_view = _numpy(columns), _numpy(valid), columns, valid
        self.present  # noqa: B018 -- made, if no stage made it yet (read below)
        self._all_valid = self.has_pad_slots = None
        self._within = [None] * len(self._within)  # the segments' slots no longer map by composition
        columns = self._columns
        batch = columns.shape[0]
        width = max(int(columns.max()) if columns.size else 0, int(self.columns0.max()) if len(self.rows) else 0)
        slot_of = np.full((batch, width + 1), -1, dtype=np.int64)
        row_index, slot_index = np.nonzero(columns >= 0)
        slot_of[row_index, columns[row_index, slot_index]] = slot_index
        self.slot = np.where(self._present, slot_of[self.rows, self.columns0], -1)
        self.all_present = bool(self._present.all())
        self.current_counts = self.media_counts(self._present)

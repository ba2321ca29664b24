"""The host bookkeeping of `Adapter.sample_media`, vectorised over the batch and cached by small keys.

A batch's visual columns and layouts follow from two things:
- where the media placeholders sit: every row's media tokens (any kind) in column order, found with one
  `flatnonzero` over the (B, L) host ids (`HostMedia`);
- which media item each placeholder belongs to. That depends only on each row's sequence of media-token kinds
  (not on their columns: padding and text lengths do not change it) and on the call's items (blocks, grids).

So an adapter runs its per-row item assignment once per (row sequences, items) signature, on *ranks*: the i-th
media token of a row stands for its column. Ranks compare as the columns do, so sorting items by their first
column and checking that items do not interleave give the same answer, and the same errors (their messages
hold counts, never columns). The result is a `MediaPlan`: which media tokens are visual, in which order, and
each row's layout. A call with a known signature then costs the mask search, one gather, one split and B
fresh layout objects.

The samples hold the plan's template layouts themselves: layouts are read-only to the engine and to the methods
(a stage that labels its tokens, `Selection.group`, gets a copy, `engine/stage_run._apply_keep`; each stage that
removes tokens makes new ones with `VisualLayout.select`), as the adapters' layout caches already share their
tensors. `fresh_layout` copies a template where a caller needs its own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vlm_prune.adapters.base import SampleMedia
from vlm_prune.engine.context import VisualLayout
from vlm_prune.engine.lru import SmallLRU

_EMPTY = torch.zeros(0, dtype=torch.long)
#: call entry holding the `HostMedia` the engine made from the host ids (`HostMedia.of` reuses it)
HOST_MEDIA = "_vlm_prune_host_media"
#: the layout of a row without media (a template: handed out through `fresh_layout` only)
EMPTY_LAYOUT = VisualLayout(_EMPTY, _EMPTY, _EMPTY, torch.zeros(0, 3, dtype=torch.long), [])


def fresh_layout(template: VisualLayout) -> VisualLayout:
    """A new `VisualLayout` sharing the template's tensors (copy.copy without its ~4 us `__reduce_ex__` path)."""
    layout = object.__new__(VisualLayout)
    layout.__dict__.update(template.__dict__)
    layout.media_grid = list(template.media_grid)
    return layout


def empty_samples(batch: int) -> list[SampleMedia]:
    """`batch` samples without media."""
    return [SampleMedia(_EMPTY, fresh_layout(EMPTY_LAYOUT)) for _ in range(batch)]


class HostMedia:
    """The media placeholders of one call, found on the host ids.

    token_ids: the placeholder id of each kind, in the order the adapter numbers its kinds (0, 1).
    columns: (N,) int64, the column of every media token, row-major (ascending within a row).
    row_counts: media tokens (all kinds) per row. present: per kind, whether the call holds any of its tokens.
    key: what the rows' kind sequences are a function of: the row counts and, with two kinds, which tokens
    are of the second kind (bit-packed).
    """

    def __init__(self, input_ids: torch.Tensor, token_ids: Sequence[int]):
        self.source, self.token_ids = input_ids, tuple(token_ids)
        ids = (input_ids if input_ids.is_cpu else input_ids.cpu()).numpy()  # the engine's host copy: no read
        first = self.first = ids == token_ids[0]  # (B, L) bool: the tokens of the first kind
        second = None
        media = first
        if len(token_ids) > 1:
            second = ids == token_ids[1]
            media = first | second
        # (ndarray methods, not np.flatnonzero / np.sum: their Python wrappers cost more than the work here)
        flat = media.ravel().nonzero()[0]
        self.batch = batch = ids.shape[0]
        self.total = len(flat)
        if batch > 1:  # (one divmod and a bincount: lighter paths than a % and a sum over an axis)
            rows, self.columns = np.divmod(flat, ids.shape[1])
            self.row_counts: list[int] = np.bincount(rows, minlength=batch).tolist()
        else:
            self.columns, self.row_counts = flat, [self.total]
        self._second = None if second is None else second.reshape(-1)[flat]  # (N,) bool: of the second kind
        if self._second is None:
            self.present = (self.total > 0,)
            self.key: tuple = (tuple(self.row_counts),)
        else:
            seconds = int(np.count_nonzero(self._second))  # (one count, not any() and all(): ~3x lighter)
            has_second = seconds > 0
            self.present = (self.total > 0 and seconds < self.total, has_second)
            self.key = (tuple(self.row_counts), np.packbits(self._second).tobytes() if has_second else b"")

    @classmethod
    def of(cls, input_ids: torch.Tensor, token_ids: Sequence[int], call: dict) -> HostMedia:
        """The call's `HostMedia` of these ids and token ids: the one the engine found while asking whether the call
        holds media (`call[HOST_MEDIA]`, same ids object and token ids), else a new one."""
        found = call.get(HOST_MEDIA)
        if found is not None and found.source is input_ids and found.token_ids == tuple(token_ids):
            return found
        return cls(input_ids, token_ids)

    def row_ranks(self) -> list[list[np.ndarray]]:
        """Per row, per kind: the ranks (0-based positions among the row's media tokens) of that kind's tokens."""
        out, start = [], 0
        for count in self.row_counts:
            if self._second is None:
                out.append([np.arange(count)])
            else:
                second = self._second[start : start + count]
                out.append([np.flatnonzero(~second), np.flatnonzero(second)])
            start += count
        return out


@dataclass
class MediaPlan:
    """What a batch signature's samples are, in rank space.

    gather: (N_visual,) int64, the media token (row-major index) behind every visual column, row by row; None
    when every media token is visual, in order. sizes: visual columns per row. layouts: per row, the template
    layout. keep: the objects whose ids the plan's key holds, kept alive so that those ids stay unique.
    derived: what a consumer derives from the layouts alone, once per plan (the engine's `MediaTemplate`, under
    its own key); read-only once stored.
    """

    gather: np.ndarray | None
    sizes: list[int]
    layouts: list[VisualLayout]
    keep: object = None
    derived: dict = field(default_factory=dict)


class PlannedSamples(list):
    """The samples (`SampleMedia`, one per row) of a planned call, with what the engine's host mirror would
    otherwise re-derive from them: `plan` (whose `derived` caches per-signature arrays) and `columns`, the (N,)
    int64 visual columns of every row, row-major (each row's `visual_columns` is a view of its part)."""

    __slots__ = ("plan", "columns")

    def __init__(self, samples: list[SampleMedia], plan: MediaPlan, columns: np.ndarray):
        super().__init__(samples)
        self.plan, self.columns = plan, columns


def build_plan(host: HostMedia, rows: list[tuple[np.ndarray | None, VisualLayout]], keep: object = None) -> MediaPlan:
    """The plan of a call from its rows' (visual ranks in column order, or None for all of them; layout)."""
    parts, sizes, start, identity = [], [], 0, True
    for (ranks, _), count in zip(rows, host.row_counts):
        if ranks is None:
            ranks = np.arange(count)
        else:
            identity = identity and len(ranks) == count and bool((ranks == np.arange(count)).all())
        parts.append(ranks + start)
        sizes.append(len(ranks))
        start += count
    gather = None if identity else np.concatenate(parts).astype(np.int64, copy=False)
    return MediaPlan(gather, sizes, [layout for _, layout in rows], keep)


class PlanCache:
    """Plans by signature (a small LRU: bounded), handed out as fresh samples."""

    def __init__(self, size: int = 32):
        self._plans: SmallLRU[MediaPlan] = SmallLRU(size)

    def samples(self, host: HostMedia, items_key: Hashable, build: Callable[[], MediaPlan]) -> PlannedSamples:
        """The call's samples: its plan (built on a miss) applied to the call's media columns."""
        plan = self._plans.get((host.key, items_key), build)
        columns = host.columns if plan.gather is None else host.columns[plan.gather]
        tensor = torch.from_numpy(columns)
        parts = tensor.split_with_sizes(plan.sizes) if len(plan.sizes) > 1 else (tensor,)  # (no Python wrapper)
        samples = [SampleMedia(part, layout) for part, layout in zip(parts, plan.layouts)]  # (templates: read-only)
        return PlannedSamples(samples, plan, columns)

    def __len__(self) -> int:
        return len(self._plans)

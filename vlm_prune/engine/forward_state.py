"""The state of one language-model forward while the engine prunes it (`engine/handle.py` owns it).

`_Forward`: the slots of the forward (original columns, 2-D mask, rotary positions), the host mirror and, after
in-LLM stages, what every later layer gets; `_Sample`: one row's media and the layout of its tokens still present.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

import torch

from vlm_prune.adapters.base import SampleMedia
from vlm_prune.engine.batch import HostBatch
from vlm_prune.engine.context import VisualLayout
from vlm_prune.engine.records import defaults, fresh
from vlm_prune.engine.stats import PruneStats


class _Sample:
    """Per-sample bookkeeping during one prefill (host tensors).

    present: (N0,) bool over `media.visual_columns`, a view of the batch's `HostBatch.present`; layout: the layout
    of the tokens still present, brought up to date on first read after a stage (from the stages' keep masks the
    host mirror lists, `HostBatch.stage_keeps`: a stage records its mask once for the batch, not per row).
    """

    def __init__(self, media: SampleMedia, original_counts: list[int], host: HostBatch, row: int):
        self.media, self.original_counts, self._host, self._row = media, original_counts, host, row
        self._layout, self._applied, self._present = media.layout, 0, None

    @property
    def present(self) -> torch.Tensor:
        if self._present is None:  # (made on first use: most prefills never ask)
            self._present = self._host.row_present(self._row)
        return self._present

    @present.setter
    def present(self, value: torch.Tensor) -> None:  # (`sample.present |= ...` writes through, then sets)
        self._present = value

    @property
    def layout(self) -> VisualLayout:
        stages = self._host.stage_keeps
        if self._applied < len(stages):  # the stages since the last read: this row's part of each keep mask
            layout, row = self._layout, self._row
            for keep, starts, counts, kept in stages[self._applied :]:
                if kept[row] < counts[row]:
                    layout = layout.select(keep[starts[row] : starts[row] + counts[row]])
            self._layout, self._applied = layout, len(stages)
        return self._layout

    @layout.setter
    def layout(self, value: VisualLayout) -> None:
        self._layout, self._applied = value, len(self._host.stage_keeps)

    @property
    def visual_columns(self) -> torch.Tensor:
        """(N,) original columns of the visual tokens still present, ascending."""
        return self.media.visual_columns[self.present]


@dataclass
class _Forward:
    """State of one language-model forward (prefill or continuation)."""

    prefill: bool
    columns: torch.Tensor  # (B, L) original column of every slot, -1 = pad slot we added
    mask: torch.Tensor  # (B, past + L) 2-D attention mask over the cached + current slots
    rope: torch.Tensor  # (R, B, L) rotary positions of the current slots
    samples: list[_Sample] = field(default_factory=list)
    shift: list[int] | None = None  # (B,) host: positions removed so far (policy "compact"), per row
    host: HostBatch | None = None  # host mirror of the slots and visual tokens (engine/batch.py)
    index: torch.Tensor | None = None  # (B, L') compaction index of the last stage
    host_segments: list[torch.Tensor] = field(default_factory=list)  # host copies of `segments`' columns
    mask_is_call_mask: bool = False  # the language model got the call's own 2-D mask (or neither had one)
    # per in-LLM segment: (first layer, columns of the segment's slots) -- for cache trimming
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    overrides: dict | None = None  # kwargs handed to every layer after an in-LLM stage
    layer_masks: dict[int, object] = field(default_factory=dict)  # decode masks per layer (no trimming)
    # (layer index, input hidden states, position embeddings, cache) of the layer before an attention stage
    attention_input: tuple | None = None
    stats: PruneStats | None = None
    visual_keep_flat: torch.Tensor | None = None
    original_embeds: torch.Tensor | None = None
    reentry: dict = field(default_factory=dict)  # row -> `reentry.RowMemory` of tokens that may come back

    @classmethod
    def decode(cls, columns: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor) -> _Forward:
        """The state of a continuation (one per decode step)."""
        return cls._fresh(prefill=False, columns=columns, mask=mask, rope=rope)

    @classmethod
    def start_prefill(cls, **values) -> _Forward:
        """The state of a prefill (`values`: the fields it sets)."""
        return cls._fresh(prefill=True, **values)

    @classmethod
    def _fresh(cls, **values) -> _Forward:
        """A state with `values`, the other fields at their defaults: the dataclass __init__'s result without its
        generated code (it runs in every forward). The mutable defaults are new empty containers, as the fields'
        own factories make them (`_FORWARD_FACTORIES`, checked by the tests)."""
        return fresh(cls, {**_FORWARD_DEFAULTS, "samples": [], "host_segments": [], "segments": [], "layer_masks": {},
                           "reentry": {}, **values})  # fmt: skip


_FORWARD_DEFAULTS = defaults(_Forward)
#: the fields with factories, and what `_fresh` makes for them (one literal each, in one call)
_FORWARD_FACTORIES = {name: value.default_factory for name, value in _Forward.__dataclass_fields__.items()
                      if value.default_factory is not MISSING}  # fmt: skip

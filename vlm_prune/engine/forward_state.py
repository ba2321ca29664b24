"""The state of one language-model forward while the engine prunes it (`engine/handle.py` owns it).

`_Forward`: the slots of the forward (original columns, 2-D mask, rotary positions), the host mirror and, after
in-LLM stages, what every later layer gets; `_Sample`: one row's media and the layout of its tokens still present.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

import numpy as np
import torch

from vlm_prune.adapters.base import SampleMedia
from vlm_prune.engine.batch import HostBatch
from vlm_prune.engine.context import VisualLayout
from vlm_prune.engine.stats import PruneStats


class _Sample:
    """Per-sample bookkeeping during one prefill (host tensors).

    present: (N0,) bool over `media.visual_columns`, a view of the batch's `HostBatch.present`; layout: the layout
    of the tokens still present, brought up to date on first read after a stage (`pending`: that stage's keep mask).
    """

    def __init__(self, media: SampleMedia, original_counts: list[int], host: HostBatch, row: int):
        self.media, self.original_counts, self._host, self._row = media, original_counts, host, row
        self._layout, self.pending, self._present = media.layout, None, None

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
        if self.pending is not None:  # (flat keep mask, first, end): this row's part of the stage's mask
            keep, first, end = self.pending
            self._layout, self.pending = self._layout.select(keep[first:end]), None
        return self._layout

    @layout.setter
    def layout(self, value: VisualLayout) -> None:
        self._layout, self.pending = value, None

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
    shift: np.ndarray | None = None  # (B,) int64 host: positions removed so far (policy "compact")
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
        generated code (it runs in every forward). The mutable defaults come from the fields' own factories."""
        forward = object.__new__(cls)
        state = forward.__dict__
        state.update(_FORWARD_DEFAULTS)
        for name, make in _FORWARD_FACTORIES:
            state[name] = make()
        state.update(values)
        return forward


_FORWARD_DEFAULTS = {name: value.default for name, value in _Forward.__dataclass_fields__.items()
                     if value.default is not MISSING}  # fmt: skip
_FORWARD_FACTORIES = tuple((name, value.default_factory) for name, value in _Forward.__dataclass_fields__.items()
                           if value.default_factory is not MISSING)  # fmt: skip

"""What decoding after a pruned prefill needs, kept on the cache object itself (`CACHE_STATE_ATTRIBUTE`).

The caller's 2-D mask and positions keep spanning the ORIGINAL sequence; `CachedPrefill` maps them onto the
cached slots of every segment (`engine/ragged.py`) with device ops only, so a decode step reads nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_prune.engine.batch import to_device
from vlm_prune.engine.records import fresh
from vlm_prune.errors import InputError
from vlm_prune.kernels import gather_tokens

CACHE_STATE_ATTRIBUTE = "_vlm_prune_state"


@dataclass
class CachedPrefill:
    """What decoding after a pruned prefill needs. It rides on the cache object itself (attribute
    `CACHE_STATE_ATTRIBUTE`), so it follows the cache into `copy.deepcopy` (transformers' prompt-reuse
    pattern), into several conversations through one handle, and into a later handle."""

    original_length: int  # L0: length of the unpruned prefill
    shift: torch.Tensor  # (B,) positions removed (policy "compact"); zeros under "preserve"
    # per segment: (first layer, (B, L_seg) original columns of its cached prefill slots)
    segments: list[tuple[int, torch.Tensor]]
    prefill_mask: list[torch.Tensor]  # per segment: (B, L_seg) mask of its cached prefill slots
    tokens: torch.Tensor | None = None  # (B, T) the ORIGINAL token ids the cache stands for (see `recorded`)
    position_state: object = None  # the adapter's `position_state()` after the prefill (Qwen: rope_deltas)
    token_chunks: list[torch.Tensor] = field(default_factory=list)  # later calls' tokens, not joined yet
    chunk_width: int = 0
    # per segment: whether every cached prefill slot is real (no padding): then a decode step without a mask of
    # its own needs no mask at all (decided on the host at the end of the prefill)
    prefill_all_valid: list[bool] = field(default_factory=list)
    # per segment: whether its cached prefill slots include pad slots (-1 columns; decided on the host; True when
    # unknown): a decode step masks them out of the gathered mask only then
    prefill_pads: list[bool] = field(default_factory=list)
    _mask_index: dict = field(default_factory=dict, repr=False)  # segment -> (clamped columns, pad slots)

    @classmethod
    def after_prefill(
        cls,
        segments: list[tuple[int, torch.Tensor]],
        final_columns: torch.Tensor,
        host_final: tuple[torch.Tensor, bool, bool | None],
        masks: tuple[torch.Tensor, bool, torch.Tensor | None],
        original_length: int,
        shift: list[int],
        tokens: torch.Tensor,
        position_state: object,
    ) -> CachedPrefill:
        """The state a pruned prefill leaves on its cache.

        segments: per segment (first layer, (B, L_seg) original columns of its cached slots), the last one's columns
        `final_columns` (B, L'); host_final: (host copy of `final_columns`, whether none of its slots is padding,
        whether some are pad slots (-1), or None when unknown);
        masks: (the (B, past + L') mask the language model got, whether it is the call's own mask, the call's own
        (B, L0) mask or None); shift: (B,) positions removed per row (policy "compact"); tokens: (B, L0) the call's
        integer input ids (no grad to detach).
        """
        mask, is_call_mask, call_mask = masks
        host_columns, final_all_valid, final_pads = host_final
        if final_pads is None:  # (the host mirror did not follow them: re-entry)
            final_pads = bool((host_columns.numpy() < 0).any())
        prefill_masks, all_valid, pads = [], [], []
        for _, seg_columns in segments:
            final = seg_columns is final_columns
            all_valid.append(final and final_all_valid)  # the host mirror of `mask != 0`
            pads.append(final_pads if final else True)
            if final and is_call_mask:  # the compacted mask already is this gather
                past = mask.shape[1] - seg_columns.shape[1]
                prefill_masks.append(mask[:, past:] if past else mask)
                continue
            seg_mask = (seg_columns >= 0).to(mask.dtype)
            if call_mask is None:
                original = torch.ones_like(seg_columns, dtype=mask.dtype)
            else:
                original = gather_tokens(call_mask.unsqueeze(-1), seg_columns.to(call_mask.device)).squeeze(-1)
            prefill_masks.append(seg_mask * original.to(mask.dtype))
        return fresh(cls, {  # (`cls(...)` without its generated __init__: once per prefill, in the hot path)
            "original_length": int(original_length),
            "shift": to_device(torch.tensor(shift, dtype=torch.long), final_columns.device),
            "segments": segments,
            "prefill_mask": prefill_masks,
            "tokens": tokens,  # stays on the device: decode steps append to it
            "position_state": position_state,
            "token_chunks": [],
            "chunk_width": 0,
            "prefill_all_valid": all_valid,
            "prefill_pads": pads,
            "_mask_index": {},
        })

    def virtual_past(self, past: int) -> int:
        """The unpruned length so far, for `past` cached positions in the first segment's layers."""
        return self.original_length + past - self.segments[0][1].shape[1]

    def drop_prefill_tail(self, count: int) -> None:
        """Follow a `cache.crop` that removed the last `count` slots of the prefill (assisted decoding feeds
        candidate tokens with the prompt and crops the rejected ones).

        Allowed while those slots are the last `count` ORIGINAL columns in every row and segment (text after
        the last pruned token); a crop that reaches pruned tokens cannot be mapped and is refused.
        """
        tail = torch.arange(self.original_length - count, self.original_length)
        for _, columns in self.segments:
            if columns.shape[1] < count or not torch.equal(columns[:, -count:].cpu(), tail.expand(len(columns), -1)):
                raise InputError(
                    "this cache holds a pruned prefill and was cropped into its pruned part, so its positions no "
                    "longer map to the original sequence; crop only the tokens after the last image, or prefill "
                    "again"
                )
        self.segments = [(layer, columns[:, :-count]) for layer, columns in self.segments]
        self._mask_index = {}
        self.prefill_mask = [mask[:, :-count] for mask in self.prefill_mask]
        self.original_length -= count

    # ---- the original tokens (follow-up turns compare what they re-send with them)
    def recorded(self, virtual_past: int) -> torch.Tensor:
        """(B, <= virtual_past) the original tokens of the cached positions (joins the pending chunks)."""
        if self.token_chunks:
            self.tokens = torch.cat([self.tokens, *self.token_chunks], dim=1)
            self.token_chunks, self.chunk_width = [], 0
        if self.tokens.shape[1] > virtual_past:  # a cache cropped after the prefill holds fewer
            self.tokens = self.tokens[:, :virtual_past]
        return self.tokens

    def add_tokens(self, new: torch.Tensor, virtual_past: int) -> None:
        """Record the (B, S) tokens a call adds after `virtual_past` cached positions (no device op)."""
        if new.shape[0] != self.tokens.shape[0]:
            return
        if self.tokens.shape[1] + self.chunk_width > virtual_past:
            self.recorded(virtual_past)
        self.token_chunks.append(new if new.device == self.tokens.device else new.to(self.tokens.device))
        self.chunk_width += new.shape[1]

    # ---- decode masks: the caller's 2-D mask spans the ORIGINAL sequence
    def segment_mask(
        self, index: int, user_mask: torch.Tensor | None, batch: int, tail: int, device
    ) -> torch.Tensor | None:
        """(B, L_seg + tail) mask of segment `index`'s cached prefill slots and the `tail` slots after them.

        user_mask: (B, original_length + tail) over the original sequence, or None (every slot real). Returns None
        (no mask: every slot real) when both the caller and the cached prefill have no padding.
        """
        if user_mask is None and index < len(self.prefill_all_valid) and self.prefill_all_valid[index]:
            return None
        if user_mask is None:
            ones = torch.ones(batch, tail, dtype=self.prefill_mask[index].dtype, device=device)
            return torch.cat([self.prefill_mask[index], ones], dim=1)
        width = self.segments[index][1].shape[1] + tail
        entry = self._mask_index.get(index)
        if entry is None or entry[0].shape[1] < width or entry[0].device != user_mask.device:
            # once per segment (and when the tail outgrows it): the gather index of the cached slots' columns
            # followed by the original columns after the prefill, and its pad slots; steps take views of both
            columns = self.segments[index][1].to(user_mask.device)
            after = torch.arange(self.original_length, self.original_length + 2 * tail + 256, device=columns.device)
            entry = self._mask_index[index] = (
                torch.cat([columns.clamp(min=0), after.expand(len(columns), -1)], dim=1),
                torch.cat([columns < 0, torch.zeros(len(columns), len(after), dtype=torch.bool,
                                                    device=columns.device)], dim=1),
            )
        safe, pads = entry
        gathered = user_mask.gather(1, safe[:, :width])
        if index < len(self.prefill_pads) and not self.prefill_pads[index]:
            return gathered  # no pad slot among the cached ones (decided on the host at the prefill)
        return gathered.masked_fill_(pads[:, :width], 0)


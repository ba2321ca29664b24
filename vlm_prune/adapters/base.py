"""The adapter contract: where things are in one model family, and nothing about methods.

An adapter answers questions about a model instance: where the decoder layers, rotary embedding and
projector are; which token ids mark media; how the media tokens of a batch map onto grids; how
positions look (1-D RoPE or 3-row M-RoPE); and the family's decode fix-ups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlm_prune.engine.context import VisualLayout


@dataclass
class SampleMedia:
    """The visual tokens of one sample of the batch.

    visual_columns: (N,) long. Columns of the (padded) input sequence holding visual tokens, ascending.
    layout: their `VisualLayout`.
    """

    visual_columns: torch.Tensor
    layout: VisualLayout


@dataclass
class ProjectorParts:
    """The multimodal projector split as projector(x) == tail(x @ weight.T + bias).

    `tail` is an `nn.Module` (sharing the model's parameters), so methods can see its dtype and its last
    linear layer.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    tail: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.nn.functional.linear(x, self.weight, self.bias))


class Adapter:
    """Base adapter. Subclasses fill the attributes in `__init__` and override the hooks they need."""

    family: str = ""
    #: number of rows of the rotary position ids: 1 (RoPE) or 3 (M-RoPE)
    rope_rows: int = 1
    #: vision-side signals this family can record ("projector", "vision_attention")
    signals: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module):
        self.model = model
        self.language_model: nn.Module = model.model.language_model
        self.layers: nn.ModuleList = self.language_model.layers
        self.rotary: nn.Module = self.language_model.rotary_emb
        self.text_config = self.language_model.config

    # ---- media ---------------------------------------------------------------------------------
    def media_token_ids(self) -> list[int]:
        raise NotImplementedError

    def kind_token_ids(self) -> dict[str, int]:
        """Media kind name ("image", "video", "scene") -> its placeholder token id (signal tables per kind)."""
        return dict(zip(("image", "video"), self.media_token_ids()))

    def check_media_inputs(self, call: dict) -> None:
        """Raise an InputError when the call's media inputs disagree with their metadata (default: no check)."""

    def sample_media(self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor) -> list[SampleMedia]:
        """Per sample of the batch, the visual columns and their layout.

        call: the top-level kwargs, plus "vision_calls": grids recorded from the vision tower's calls
        (generate() encodes media before the forward and passes only `mm_encoder_outputs`).
        """
        raise NotImplementedError

    def vision_module(self) -> nn.Module | None:
        """The vision tower whose calls are recorded (for grid metadata generate() does not forward)."""
        return None

    def record_vision_call(self, args: tuple, kwargs: dict) -> object:
        """What to remember of one vision-tower call (default: nothing)."""
        return None

    # ---- positions -----------------------------------------------------------------------------
    def rope_positions(self, position_ids: torch.Tensor | None, batch: int, length: int, past: int) -> torch.Tensor:
        """(R, B, L) rotary positions as the language model would compute them from what it received."""
        if position_ids is None:
            base = torch.arange(past, past + length).view(1, 1, -1).expand(self.rope_rows, batch, -1)
            return base.clone()
        if position_ids.ndim == 2:
            return position_ids.unsqueeze(0).expand(self.rope_rows, -1, -1).clone()
        if position_ids.ndim == 3 and position_ids.shape[0] == self.rope_rows + 1:
            return position_ids[1:].clone()
        if position_ids.ndim == 3 and position_ids.shape[0] == self.rope_rows:
            return position_ids.clone()
        if position_ids.ndim == 3 and position_ids.shape[0] == 1:  # text positions, the same on every axis
            return position_ids.expand(self.rope_rows, -1, -1).clone()
        raise ValueError(f"unexpected position_ids shape {tuple(position_ids.shape)} for {self.family}")

    def lm_position_ids(self, contiguous: torch.Tensor) -> torch.Tensor:
        """What to pass the language model as position_ids so that masking sees contiguous positions.

        contiguous: (B, L). The true positions reach the rotary embedding through the engine's hook.
        """
        return contiguous

    def decode_position_ids(
        self, call: dict, virtual_past: int, q_len: int, batch: int, state: object = None
    ) -> torch.Tensor | None:
        """Top-level position_ids to inject when the caller passed none after a pruned prefill.

        The unpruned model would derive them from the cache length, which pruning shortened. `state` is what
        `position_state()` returned after the prefill.
        """
        return None

    def position_state(self) -> object:
        """What positions of later calls on a pruned cache depend on, read right after its prefill (kept with
        the cache). Default: nothing."""
        return None

    def follow_up_position_ids(self, position_ids: torch.Tensor, state: object) -> torch.Tensor | None:
        """Corrected top-level position_ids of a text-only call on a pruned cache (None = keep the caller's)."""
        return None

    # ---- vision signals ------------------------------------------------------------------------
    def projector_module(self) -> nn.Module | None:
        """The module whose INPUT is the projector input (hooked when a stage needs "projector")."""
        return None

    def projector_parts(self) -> ProjectorParts | None:
        return None

    def projector_rows(self, captured: list[torch.Tensor], call: dict) -> dict[str, torch.Tensor]:
        """Map captured projector inputs to rows aligned with media tokens: {"image": (N_img, d), "video": ...}."""
        raise NotImplementedError

    def vision_attention_layer(self) -> nn.Module | None:
        """The vision-tower layer whose INPUT gives VisionZip's attention signal (None = unsupported)."""
        return None

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> object:
        """Compute (received attention, keys) from one call of `vision_attention_layer()`."""
        raise NotImplementedError

    def pixel_rows(self, recorded: list, call: dict) -> dict[str, torch.Tensor]:
        """Recorded vision-tower inputs [(pixels, grid)] -> per-kind (N, P) pixels behind each media token."""
        raise NotImplementedError

    def vision_attention_rows(
        self, recorded: list, call: dict
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Recorded signals -> per-kind tables aligned with media tokens: ({"image": (N,)}, {"image": (N, d)})."""
        raise NotImplementedError

    # ---- language-model kwargs ----------------------------------------------------------------
    def compact_lm_kwargs(self, kwargs: dict, keep_columns: torch.Tensor, visual_keep: torch.Tensor) -> None:
        """Compact family-specific LM kwargs in place (e.g. Qwen3-VL deepstack). Default: nothing."""

    def check_layer_stage(self, layer: int) -> None:
        """Raise if an in-LLM stage at `layer` cannot be served on this family."""


SPLIT_MEDIA_HINT = (
    "If generate(prefill_chunk_size=N) split the prompt inside or before the media, leave it unset or make N "
    "larger than the position of the last media token (chunks after the media are supported)"
)


def item_counts(call: dict, modality: str) -> list[int] | None:
    """Tokens per media item from pre-encoded `mm_encoder_outputs[modality].pooler_output`, if present."""
    encoded = (call.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is None:
        return None
    pooled = getattr(encoded, "pooler_output", None)
    if pooled is None:
        return None
    if isinstance(pooled, torch.Tensor):
        pooled = list(pooled)
    return [int(item.shape[0]) for item in pooled]

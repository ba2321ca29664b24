"""What a method sees: the per-sample, per-stage selection context.

A method never touches the model. For ONE sample at ONE stage it receives a `SelectionContext`
holding the visual tokens that are still in the sequence (in sequence order), their layout, the
hidden states, the budget and, on request, signals recorded during the same forward (attention
rows recomputed from q/k, projector inputs, vision-tower CLS attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vlm_prune.engine.segments import Segments

IMAGE, VIDEO, SCENE = 0, 1, 2


@dataclass
class VisualLayout:
    """Layout of the visual tokens of one sample, in sequence order.

    Shapes (N = number of visual tokens described):
        media_index: (N,) long. Which media item of the sample the token belongs to (0-based, order of
            appearance in the prompt).
        kind: (N,) long. `IMAGE` (0), `VIDEO` (1) or `SCENE` (2: a 3-D scene's voxel tokens, LLaVA-3D).
        frame: (N,) long. Temporal grid index inside the media item (0 for images).
        grid_thw: (N, 3) long. The token's (t, h, w) coordinate in its media grid; -1 for tokens that sit
            outside any grid (e.g. LLaVA-NeXT row-newline tokens).
        media_grid: one (T, H, W) grid size per media item (after any spatial merge). For media made of
            several grids (LLaVA-NeXT base image + anyres crops) this is the base grid.
        group: (N,) long or None. A label a merging stage gave each surviving token (e.g. PruneVid's
            static group of a segment or a frame's dynamic group), for the method's later stages; None
            until a stage sets one (`Selection.group`).
        voxel: (N, 3) long or None. SCENE tokens: the integer voxel coordinate (i, j, k), scene minimum at 0
            (grid_thw holds it too); other tokens -1. None when the sample has no scene.
        xyz: (N, 3) float or None. SCENE tokens: the voxel centre in metres (axis-aligned world frame); other
            tokens NaN. None when the sample has no scene.
    """

    media_index: torch.Tensor
    kind: torch.Tensor
    frame: torch.Tensor
    grid_thw: torch.Tensor
    media_grid: list[tuple[int, int, int]] = field(default_factory=list)
    group: torch.Tensor | None = None
    voxel: torch.Tensor | None = None
    xyz: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.media_index.numel())

    def select(self, keep: torch.Tensor) -> VisualLayout:
        """The layout of the tokens where `keep` (bool (N,) or long indices) is set."""
        return VisualLayout(
            media_index=self.media_index[keep],
            kind=self.kind[keep],
            frame=self.frame[keep],
            grid_thw=self.grid_thw[keep],
            media_grid=list(self.media_grid),
            group=None if self.group is None else self.group[keep],
            voxel=None if self.voxel is None else self.voxel[keep],
            xyz=None if self.xyz is None else self.xyz[keep],
        )

    @property
    def num_media(self) -> int:
        return len(self.media_grid)


@dataclass
class Selection:
    """What a selector returns when it also rewrites features (merging methods).

    keep_mask: (N,) bool, True = the token stays, in its own position.
    features: (K, D) or None. New hidden states for the kept tokens, K = keep_mask.sum(), in sequence
        order. A merged token therefore sits at the position of the kept token it replaces.
    group: (K,) long or None. A label per kept token that later stages of the method read back from
        `ctx.layout.group` (the engine carries it through every later stage).
    represents: (N,) long or None. For each of the N tokens, the index of the KEPT token standing for it
        (a kept token stands for itself); a later re-entry stage brings the dropped ones back from it
        (`engine/reentry.py`).
    """

    keep_mask: torch.Tensor
    features: torch.Tensor | None = None
    group: torch.Tensor | None = None
    represents: torch.Tensor | None = None


@dataclass
class SelectionContext:
    """Everything a method may use to choose the visual tokens of ONE sample at ONE stage.

    Shapes: N = `num_visual` (this sample's visual tokens entering the stage), L = this sample's current
    sequence length without padding, D = hidden size, H = attention heads.

    Attributes:
        layer: 0 for pre-LLM, k for the input of decoder layer k.
        num_visual: N.
        budget: total visual tokens to keep for this sample, or None when the method decides alone.
        budget_per_media: tokens to keep per media item present (index = media item), or None (read-only: the
            engine shares these lists between rows and calls).
        visual_features: (N, D). Projected embeddings at layer 0, hidden states at layer k.
        hidden_states: (L, D). The whole current sequence of this sample (no padding).
        visual_index: (N,) long. Where the visual tokens sit in `hidden_states`.
        input_ids: (L,) long. Token ids of the current sequence.
        layout: the `VisualLayout` of the N visual tokens (read-only: the engine shares it between calls).
        seed: the seed for any randomness (same sample, same seed -> same choice, whatever the batch).
        attention_fn: (Q,) query indices into the current sequence -> (H, Q, L) attention probabilities
            of decoder layer k-1 (only at layer k >= 1 when the method asked for "attention"); called as
            `attention_fn(query, layer)` it serves layer k too (see `attention_rows`).
        projector_inputs: (N, d_in) features entering the multimodal projector for these tokens, and
        projector: the callable mapping them to the projected embeddings (layer 0, "projector").
        projector_first: (weight (d_h, d_in), bias (d_h,) or None) of the projector's first, linear layer,
        projector_tail: the rest of the projector, so that
            projector(x) == projector_tail(x @ weight.T + bias). Lets ZOO-Prune share W1 x across perturbations.
        vision_attention: (N,) attention each token received from the vision tower's CLS query (or the
            documented fallback), and vision_keys: (N, d_k) keys of that layer ("vision_attention").
        pixels: (N, P) the vision tower's pixel input behind each token (Qwen: the m x m patches of its merge
            group, each C x temporal_patch x p x p normalised values), on request ("pixels").
        segments_fn: builds the sample's `Segments` (read them through `ctx.segments`).
        extras: method-specific signals.
    """

    layer: int
    num_visual: int
    budget: int | None
    budget_per_media: list[int] | None
    visual_features: torch.Tensor
    hidden_states: torch.Tensor
    visual_index: torch.Tensor
    input_ids: torch.Tensor
    layout: VisualLayout
    seed: int = 0
    attention_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    projector_inputs: torch.Tensor | None = None
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None
    projector_first: tuple[torch.Tensor, torch.Tensor | None] | None = None
    projector_tail: Callable[[torch.Tensor], torch.Tensor] | None = None
    vision_attention: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    segments_fn: Callable[[], Segments] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    _segments: Segments | None = field(default=None, repr=False, compare=False)

    @property
    def segments(self) -> Segments:
        """The sample's segment map (`vlm_prune.engine.segments`): which media item is the query (the last),
        which are demonstrations, where each item's paired text is. Built on first use, then cached."""
        if self._segments is None:
            if self.segments_fn is None:
                from vlm_prune.errors import PruneError

                raise PruneError("this context has no segment map (build one with engine.segments.build_segments)")
            self._segments = self.segments_fn()
        return self._segments

    @property
    def text_index(self) -> torch.Tensor:
        """(T,) indices of the text tokens after the last visual token (question and assistant prompt)."""
        length = self.hidden_states.shape[0]
        start = int(self.visual_index.max()) + 1 if self.num_visual else 0
        return torch.arange(start, length, device=self.hidden_states.device)

    @property
    def last_index(self) -> int:
        """Index of the last token of the sequence (FastV's query)."""
        return self.hidden_states.shape[0] - 1

    def attention_rows(self, query_index: torch.Tensor | int, layer: int | None = None) -> torch.Tensor:
        """(H, Q, L) attention probabilities for the given query rows, recomputed from q/k.

        layer: None or k - 1 (default): decoder layer k-1, from the input that layer received. k: decoder layer k
            itself, from this stage's input hidden states (what layer k would attend to over the tokens present
            when the stage starts, i.e. before this stage prunes). Both are head-wise softmax rows over the current
            L tokens, causal, exactly what eager attention with output_attentions would return for those rows.
        Raises a PruneError when the method did not declare `needs = {"attention"}` or runs at layer 0.
        """
        if self.attention_fn is None:
            from vlm_prune.errors import PruneError

            raise PruneError(
                "attention rows are only available at layer k >= 1 to methods that declare "
                "needs={'attention'}; add it to the method class"
            )
        if isinstance(query_index, int):
            query_index = torch.tensor([query_index], device=self.hidden_states.device)
        if layer is None or layer == self.layer - 1:
            return self.attention_fn(query_index)
        if layer != self.layer:
            from vlm_prune.errors import PruneError

            raise PruneError(
                f"a stage at layer {self.layer} can read attention rows of layers {self.layer - 1} and {self.layer}, "
                f"not {layer}"
            )
        return self.attention_fn(query_index, layer)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from `seed` and the stage, so choices do not depend on batch position."""
        return torch.Generator().manual_seed(self.seed * 1000003 + self.layer)


@dataclass
class BatchSelectionContext:
    """Every row's visual tokens at ONE stage, for methods that select the whole batch at once
    (`ScorerMethod.score_batch`). The engine builds it when the rows are left-padded (each row's real tokens are
    its last slots, so every row's last token sits at slot L-1) and every row has a budget; else it calls
    `select` per row with a `SelectionContext`. Row r's entries are the same tokens, in the same order, as its
    `SelectionContext`'s.

    Shapes: B rows, N = the most visual tokens of a row (pad entries after a row's own), L = the current padded
    sequence length, D = hidden size, H = attention heads, M = the most media items of a row.

    Attributes:
        layer: 0 for pre-LLM, k for the input of decoder layer k.
        num_visual: visual tokens of each row (B ints).
        visual_index: (B, N) long, each visual token's slot in `hidden_states`, -1 at pad entries.
        media_index: (B, N) long, each visual token's media item in its row, -1 at pad entries.
        budget_per_media: (B, M) long, tokens to keep per media item of each row (0 past a row's items).
        hidden_states: (B, L, D), the current padded sequence.
        attention_mask: (B, L), nonzero at a row's real (non-padding) slots (`key_mask`: as bool).
        attention_fn: (query slots (Q host ints), layer) -> (B, H, Q, L) float32 attention probabilities of every
            row at those padded slots over its real keys (padding 0), or None when they cannot be batched; only
            at layer k >= 1 for methods that declare needs={'attention'}, as `SelectionContext.attention_rows`.
    """

    layer: int
    num_visual: list[int]
    visual_index: torch.Tensor
    media_index: torch.Tensor
    budget_per_media: torch.Tensor | None
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    attention_fn: Callable[[tuple[int, ...], int], torch.Tensor | None] | None = None

    @property
    def key_mask(self) -> torch.Tensor:
        """(B, L) bool, True at a row's real (non-padding) slots."""
        return self.attention_mask != 0

    @property
    def last_index(self) -> int:
        """The padded slot of every row's last token (FastV's query): L - 1."""
        return self.hidden_states.shape[1] - 1

    def attention_rows(self, query_slots: tuple[int, ...], layer: int | None = None) -> torch.Tensor | None:
        """(B, H, Q, L) attention probabilities of every row at the padded `query_slots` (host ints), from
        decoder layer k-1 (default) or k, as `SelectionContext.attention_rows`; None when the engine cannot
        batch them (the method then returns None and the stage runs row by row)."""
        if self.attention_fn is None:
            from vlm_prune.errors import PruneError

            raise PruneError(
                "attention rows are only available at layer k >= 1 to methods that declare "
                "needs={'attention'}; add it to the method class"
            )
        return self.attention_fn(tuple(query_slots), self.layer - 1 if layer is None else layer)

"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., arXiv 2403.06764).

At the input of decoder layer K (default 2) each visual token is scored by the attention the last
token of the prompt pays to it in layer K-1, averaged over heads; the top (1 - R) share is kept, in
its original order and at its original positions (default R = 50 %, i.e. `keep=0.5`).

Deviations from the reference code:
* the attention row is recomputed from q/k of layer K-1 by the engine (`ctx.attention_rows`), so
  eager attention / `output_attentions` are never needed (the reference requires eager);
* a left-padded batch is scored and ranked in one batched chain (`score_batch`, `topk_mask_batched`), the
  same masks as row by row;
* the top-k is taken per media item with the engine's per-item budget (the paper has one image, so
  this is the same there); `per_media=False` ranks all of the sample's visual tokens together and
  uses the sample's total budget instead, as the reference does over its single image span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_prune.engine.context import BatchSelectionContext, SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.base import ScorerMethod, topk_mask
from vlm_prune.methods.registry import register


def last_token_attention_scores(attention: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """FastV score: head-mean attention of one query row over the visual tokens.

    attention: (H, 1, L) attention probabilities of the query (the last token).
    visual_index: (N,) long positions of the visual tokens in the sequence.
    Returns (N,) float32.
    """
    if attention.dim() != 3 or attention.shape[1] != 1:
        raise ValueError(f"expected (H, 1, L) attention of one query row, got {tuple(attention.shape)}")
    return attention[:, 0, :].float().mean(dim=0)[visual_index]


def batched_last_token_scores(attention: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """`last_token_attention_scores` of every row at once.

    attention: (B, H, 1, L) the query's attention probabilities in each row; visual_index: (B, N) long slots
    of each row's visual tokens, -1 at pad entries (their scores are the row's slot 0: never read).
    Returns (B, N) float32.
    """
    if attention.dim() != 4 or attention.shape[2] != 1:
        raise ValueError(f"expected (B, H, 1, L) attention of one query row, got {tuple(attention.shape)}")
    return attention[:, :, 0, :].float().mean(dim=1).gather(1, visual_index.clamp(min=0))


@dataclass
class FastV(ScorerMethod):
    """FastV: keep the visual tokens the last token attends to most at layer `layer` - 1.

    keep: fraction of each media item's visual tokens kept (default 0.5, i.e. R = 50 %) or a count.
    layer: K, the decoder layer on whose input the pruning happens (default 2; must be >= 1).
    per_media: top-k per media item (default) or over all of the sample's visual tokens.
    """

    keep: float | int | None = 0.5
    layer: int = 2
    per_media: bool = True
    needs = frozenset({"attention"})
    name = "fastv"

    def __post_init__(self) -> None:
        if int(self.layer) < 1:
            raise MethodOptionError(f"FastV scores with layer K-1 attention: layer must be >= 1, got {self.layer}")

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        return last_token_attention_scores(ctx.attention_rows(ctx.last_index), ctx.visual_index)

    def score_batch(self, batch: BatchSelectionContext) -> torch.Tensor | None:
        """(B, N_max) every row's scores at once (the last token of every left-padded row sits at L-1)."""
        attention = batch.attention_rows((batch.last_index,))
        if attention is None:
            return None
        return batched_last_token_scores(attention, batch.visual_index)

    def batch_select(self):
        return super().batch_select() if self.per_media else None  # (one budget per sample: row by row)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if self.per_media:
            return super().select(ctx)
        if ctx.budget is None:
            raise BudgetError("FastV needs a budget: pass keep=... to apply()")
        return topk_mask(self.score(ctx), ctx.budget)


register("fastv", FastV, "FastV (2403.06764): at layer K=2 keep the tokens the last token attends to most.")

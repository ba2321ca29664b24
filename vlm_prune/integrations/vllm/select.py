"""Selection of one media item's rows inside vLLM: the transformers engine's own selection code, no vLLM import.

vLLM's `embed_multimodal` returns one (n, D) tensor per media item, in the item's (t, row, col) raster order (the
LLM's order). `select_item` builds the `SelectionContext` the transformers engine would build for that item alone
(the same layout, budget, seed and signals) and calls the method's stage `select`, so both engines keep the same
tokens for the same features. Then `item_positions` gives the kept tokens' original M-RoPE (t, h, w) offsets,
which vLLM's `recompute_mrope_positions` places after the item's vision-start token.

`random` runs with `per_item=True` (`spec.parse_spec` sets it): every item draws from a fresh generator of the
seed, as vLLM encodes and caches items apart from the prompt they come in; `vlm_prune.apply(..., "random",
per_item=True)` keeps the same tokens for every item of a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_prune.adapters.qwen_vl import item_grid
from vlm_prune.engine.budget import tokens_to_keep
from vlm_prune.engine.context import IMAGE, VIDEO, Selection, SelectionContext, VisualLayout
from vlm_prune.errors import PruneError
from vlm_prune.integrations.vllm.spec import PruneSpec


def raster_grid(t: int, h: int, w: int) -> torch.Tensor:
    """(t*h*w, 3) long (t, row, col) coordinates in raster order: a writable copy of the Qwen adapter's cached grid."""
    return item_grid(t, h, w).clone()


@dataclass
class ItemSignals:
    """Vision-side signals of one item, rows aligned with its tokens (what `engine/signals.py` gives a context).

    projector_inputs: (n, d_in) features entering the merger's MLP; projector: callable with `.weight`, `.bias`,
        `.tail` (a `ProjectorParts`). vision_attention (n,) and vision_keys (n, d_k): VisionZip's signal.
    """

    projector_inputs: torch.Tensor | None = None
    projector: object | None = None
    vision_attention: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None


def item_context(
    features: torch.Tensor, grid: tuple[int, int, int], modality: str, budget: int | None, seed: int
) -> SelectionContext:
    """The pre-LLM `SelectionContext` of one media item alone: features (n, D), grid (T, H, W) after the merge."""
    t, h, w = grid
    n = features.shape[0]
    if n != t * h * w:
        raise PruneError(f"a media item of grid {grid} has {t * h * w} tokens, got {n} embedding rows")
    coords = raster_grid(t, h, w)
    kind = VIDEO if modality == "video" else IMAGE
    layout = VisualLayout(
        media_index=torch.zeros(n, dtype=torch.long),
        kind=torch.full((n,), kind, dtype=torch.long),
        frame=coords[:, 0].clone(),
        grid_thw=coords,
        media_grid=[(t, h, w)],
    )
    return SelectionContext(
        layer=0,
        num_visual=n,
        budget=budget,
        budget_per_media=None if budget is None else [budget],
        visual_features=features,
        hidden_states=features,
        visual_index=torch.arange(n, device=features.device),
        input_ids=torch.zeros(n, dtype=torch.long, device=features.device),
        layout=layout,
        seed=seed,
    )


def select_item(
    features: torch.Tensor,
    grid: tuple[int, int, int],
    modality: str,
    spec: PruneSpec,
    built: tuple | None = None,
    signals: ItemSignals | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one item: features (n, D) in raster order over the LLM grid (T, H, W).

    Returns (keep_mask (n,) bool, kept features (k, D)), k == `spec.count(...)` for this grid; merged features
    (pool, visionzip) replace the kept rows. `built`: `spec.build()`, cached by the caller.
    """
    n = features.shape[0]
    if not spec.prunes(modality):
        return torch.ones(n, dtype=torch.bool, device=features.device), features
    method, stage = built if built is not None else spec.build()
    budget = None if stage.counts_itself else tokens_to_keep(stage.keep, n, n)
    ctx = item_context(features, grid, modality, budget, spec.seed)
    if signals is not None:
        ctx.projector_inputs = signals.projector_inputs
        if signals.projector is not None:
            parts = signals.projector
            ctx.projector = parts
            ctx.projector_first = (parts.weight, parts.bias)
            ctx.projector_tail = parts.tail
        ctx.vision_attention = signals.vision_attention
        ctx.vision_keys = signals.vision_keys
    result = stage.select(ctx)
    merged = None
    if isinstance(result, Selection):
        merged, result = result.features, result.keep_mask
    keep_mask = torch.as_tensor(result, device=features.device)
    if keep_mask.dtype != torch.bool or keep_mask.shape != (n,):
        raise PruneError(f"{stage.name} returned {keep_mask.dtype} {tuple(keep_mask.shape)}, want bool ({n},)")
    kept = features[keep_mask] if merged is None else merged.to(features.dtype)
    return keep_mask, kept


def item_positions(
    grid: tuple[int, int, int], keep_mask: torch.Tensor | None = None, t_factor: float = 1.0
) -> torch.Tensor:
    """(k, 4) long M-RoPE offsets of the kept tokens, relative to the item's start.

    Columns 0..2: each kept token's ORIGINAL (t * t_factor, h, w), as `get_mrope_input_positions` numbers an
    unpruned item (t scaled as there: int64 of t * second_per_grid_ts * tokens_per_second); the model sends these
    on (`positions.media_columns`). Column 3: where the text after the item continues, relative to the item's
    start: the unpruned extent max(t_pos) + 1, H, W maxed, i.e. our "preserve" policy (vLLM's own EVS continues
    from base + llm_grid_w instead, which differs on tall images and long videos).
    """
    t, h, w = grid
    coords = raster_grid(t, h, w)
    if t_factor != 1.0:
        coords[:, 0] = (coords[:, 0].double() * t_factor).long()
    extent = int(coords.max()) + 1 if coords.numel() else 0
    if keep_mask is not None:
        coords = coords[keep_mask.cpu()]
    return torch.cat([coords, torch.full((coords.shape[0], 1), extent, dtype=torch.long)], dim=1)

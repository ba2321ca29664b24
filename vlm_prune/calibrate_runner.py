"""Run a model on sample inputs and measure per-layer cross-modal attention (offline tool).

This is the only place in vlm_prune that asks a model for attention weights: it switches the model to
eager attention with `output_attentions=True` for the duration of the call (and restores the previous
implementation), which is fine for a one-off calibration on a handful of samples. The pruning engine
itself never does this. See `vlm_prune.methods.calibration` for the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from vlm_prune.methods.calibration import cross_modal_share, inflection_layers, propose_schedule

_MEDIA_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def media_token_ids(model: Any) -> list[int]:
    """Placeholder token ids of the model's media (image/video), from its config."""
    ids: set[int] = set()
    for config in (model.config, getattr(model.config, "text_config", None)):
        for attr in _MEDIA_ID_ATTRS:
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    return sorted(ids)


@torch.no_grad()
def layer_shares(
    attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, media: list[int]
) -> list[list[float]]:
    """Per batch row with media: the cross-modal share of every layer.

    attentions: per layer (B, H, L, L); input_ids: (B, L); attention_mask: (B, L) or None.
    """
    media_ids = torch.tensor(media, device=input_ids.device)
    out: list[list[float]] = []
    for b in range(input_ids.shape[0]):
        valid = torch.ones_like(input_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        is_media = torch.isin(input_ids[b], media_ids) & valid
        visual_pos = is_media.nonzero(as_tuple=True)[0]
        if visual_pos.numel() == 0:
            continue
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text_pos = ((positions > visual_pos.max()) & valid).nonzero(as_tuple=True)[0]
        if text_pos.numel() == 0:
            continue
        out.append([cross_modal_share(attn[b][:, text_pos], visual_pos, text_pos) for attn in attentions])
    return out


def calibrate(
    model: Any,
    inputs_list: Iterable[dict[str, Any]],
    *,
    keep: float = 0.25,
    n_stages: int = 3,
    min_gap: int | None = None,
    media_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Measure cross-modal attention per decoder layer and propose an AdaptInfer schedule.

    model: a transformers model whose forward accepts `output_attentions=True` and returns
        `.attentions` for its decoder layers (VLMs return the language model's).
    inputs_list: processor outputs (dicts with `input_ids`, optional `attention_mask`, pixel values...).
    media_ids: placeholder token ids of media; default from the model config.
    Returns {"model", "num_layers", "samples", "shares", "inflection_layers", "schedule", "keep"}.
    """
    media = list(media_ids) if media_ids is not None else media_token_ids(model)
    if not media:
        raise ValueError("cannot find the media placeholder token ids in the model config: pass media_ids=[...]")
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != "eager":
        model.set_attn_implementation("eager")
    per_sample: list[list[float]] = []
    try:
        for inputs in inputs_list:
            out = model(**inputs, output_attentions=True, use_cache=False)
            attentions = [a for a in out.attentions if a is not None]
            per_sample += layer_shares(attentions, inputs["input_ids"], inputs.get("attention_mask"), media)
    finally:
        if previous is not None and previous != "eager":
            model.set_attn_implementation(previous)
    if not per_sample:
        raise ValueError("no sample had media tokens followed by text: nothing to calibrate on")
    shares = torch.tensor(per_sample).mean(dim=0).tolist()
    inflection = inflection_layers(shares, n_stages, min_gap)
    schedule = propose_schedule(shares, keep, n_stages, min_gap)
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "num_layers": len(shares),
        "samples": len(per_sample),
        "shares": shares,
        "inflection_layers": inflection,
        "keep": keep,
        "schedule": schedule.to_dict(),
    }


@torch.no_grad()
def last_token_rows_per_layer(model: Any, inputs: dict[str, Any]) -> list[list[torch.Tensor]]:
    """Per batch row, per decoder layer: the (H, 1, L_row) attention of the row's last token, recomputed from
    q/k on what each layer's attention received (sdpa / flash stay on: no eager, no `output_attentions`).

    L_row counts the row's real (non-padding) tokens; padding never receives attention.
    """
    from vlm_prune.adapters import adapter_for
    from vlm_prune.engine.attention_rows import recompute_attention_rows

    layers = adapter_for(model).layers
    seen: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def recorder(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden.detach(), kwargs["position_embeddings"])

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    mask = inputs.get("attention_mask")
    batch = inputs["input_ids"].shape[0]
    out: list[list[torch.Tensor]] = []
    for b in range(batch):
        valid = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool) if mask is None else mask[b].bool().cpu()
        slots = valid.nonzero(as_tuple=True)[0]
        rows = []
        for i, layer in enumerate(layers):
            hidden, (cos, sin) = seen[i]
            h = hidden[b : b + 1, slots.to(hidden.device)]
            pick = min(b, cos.shape[0] - 1)  # rotary tables are per row, or one row shared by the batch
            rope = (cos[pick : pick + 1, slots.to(cos.device)], sin[pick : pick + 1, slots.to(sin.device)])
            query = torch.tensor([len(slots) - 1], device=h.device)
            rows.append(recompute_attention_rows(layer.self_attn, h, rope, query, None)[0].cpu())
        out.append(rows)
    return out


def calibrate_adatoken3d(
    model: Any,
    inputs_list: Iterable[dict[str, Any]],
    *,
    n_stages: int = 3,
    mass: float = 0.05,
    min_share: float = 0.02,
    min_keep: float = 0.05,
    media_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """AdaToken-3D's tailoring on sample inputs: per decoder layer, the share of the last instruction token's
    attention that flows into spatial (media) tokens and the fraction of them carrying under `mass` of it,
    then the proposed schedule (`vlm_prune.methods.adatoken3d.propose_schedule`).

    Returns {"model", "num_layers", "samples", "shares", "low_fractions", "needed", "schedule", "keep"}: "keep"
    is the proposal's equivalent average fraction of spatial tokens over layers.
    """
    from vlm_prune.methods.adaptinfer import equivalent_average_tokens
    from vlm_prune.methods.adatoken3d import (
        low_contribution_fraction,
        needed_fractions,
        propose_schedule,
        spatial_share,
    )

    media = list(media_ids) if media_ids is not None else media_token_ids(model)
    if not media:
        raise ValueError("cannot find the media placeholder token ids in the model config: pass media_ids=[...]")
    shares: list[list[float]] = []
    lows: list[list[float]] = []
    for inputs in inputs_list:
        per_row = last_token_rows_per_layer(model, inputs)
        mask = inputs.get("attention_mask")
        for b, rows in enumerate(per_row):
            ids = inputs["input_ids"][b].cpu()
            if mask is not None:
                ids = ids[mask[b].bool().cpu()]
            visual = torch.isin(ids, torch.tensor(media)).nonzero(as_tuple=True)[0]
            if visual.numel() == 0:
                continue
            shares.append([spatial_share(r, visual) for r in rows])
            lows.append([low_contribution_fraction(r.float().mean(0)[0, visual], mass) for r in rows])
    if not shares:
        raise ValueError("no sample had media tokens: nothing to calibrate on")
    mean_shares = torch.tensor(shares).mean(0).tolist()
    mean_lows = torch.tensor(lows).mean(0).tolist()
    schedule = propose_schedule(mean_shares, mean_lows, n_stages, min_share=min_share, min_keep=min_keep)
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "num_layers": len(mean_shares),
        "samples": len(shares),
        "shares": mean_shares,
        "low_fractions": mean_lows,
        "needed": needed_fractions(mean_shares, mean_lows, min_share=min_share, min_keep=min_keep),
        "mass": mass,
        "schedule": schedule.to_dict(),
        "keep": equivalent_average_tokens(schedule, len(mean_shares), 1),
    }

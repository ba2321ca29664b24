"""Depth expansion of a trained demo decoder: more layers, same function at the start.

`benchmarks/train_demo_models.py --init-from <saved model folder> --expand-layers 12` builds a deeper decoder
from the shipped one and trains all of it. The plan (`expansion_plan`):

  * the original layers keep their order; original layer 0 stays at position 0 and the last original layer
    ends up last;
  * the new layers go into the gaps in front of original layers 1, 2, ... (as evenly as possible, the
    remainder to the earlier gaps). For 4 -> 12 layers the originals land at 0, 4, 8, 11; for 4 -> 16 at
    0, 5, 10, 15;
  * a new layer is a copy of the original layer that follows it (norms, q/k/v, gate/up) with its two output
    projections (attention `o_proj`, MLP `down_proj`) set to zero. It adds nothing to the residual stream, so
    the expanded model computes exactly the original's logits (`tests/test_demo_models.py` checks this), and
    because every new layer in a gap sees the same residual stream as the original layer after it, its
    attention pattern starts equal to that layer's. Training then moves all layers.

The attention losses of the recipe name original layers (key words: layer 0; cell retrieval: layer 2; yes/no:
layer 3); `mapped_layer` gives their positions in the deeper decoder, so the same heads keep the same jobs.
Zero-initialised residual branches for added layers follow the identity-initialisation idea of
"LLaMA Pro: Progressive LLaMA with Block Expansion" (Wu et al., 2024, arXiv 2401.02415).
"""

from __future__ import annotations

import re

import torch

_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
ZEROED = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


def expansion_plan(old_layers: int, new_layers: int) -> list[tuple[int, bool]]:
    """Per new position: (original layer it copies, whether it is that original itself).

    >>> expansion_plan(4, 12)[:5]
    [(0, True), (1, False), (1, False), (1, False), (1, True)]
    """
    if new_layers < old_layers or old_layers < 1:
        raise ValueError(f"cannot expand {old_layers} decoder layers to {new_layers}")
    gaps = old_layers - 1
    extra = new_layers - old_layers
    if gaps == 0 and extra:
        raise ValueError("a 1-layer decoder has no gap to put new layers in")
    per_gap = [extra // gaps + (1 if g < extra % gaps else 0) for g in range(gaps)] if gaps else []
    plan: list[tuple[int, bool]] = [(0, True)]
    for orig in range(1, old_layers):
        plan += [(orig, False)] * per_gap[orig - 1] + [(orig, True)]
    return plan


def mapped_layer(plan: list[tuple[int, bool]], original: int) -> int:
    """Position of original layer `original` in the expanded decoder."""
    return next(pos for pos, (src, is_orig) in enumerate(plan) if is_orig and src == original)


def expand_state_dict(state: dict[str, torch.Tensor], plan: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
    """The state dict of the expanded model from the original's: decoder layer keys renumbered and copied per
    `plan`, new layers' output projections zeroed; every other key unchanged."""
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[int, dict[str, tuple[str, str]]] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m is None or "language_model" not in key:  # vision tower layers keep their own numbering
            out[key] = value.clone()
            continue
        per_layer.setdefault(int(m.group(2)), {})[m.group(3)[1:]] = (m.group(1), key)
    if sorted(per_layer) != list(range(max(src for src, _ in plan) + 1)):
        raise ValueError(f"decoder layers in the checkpoint {sorted(per_layer)} do not match the plan")
    for pos, (src, is_orig) in enumerate(plan):
        for suffix, (prefix, key) in per_layer[src].items():
            value = state[key].clone()
            if not is_orig and suffix in ZEROED:
                value.zero_()
            out[f"{prefix}{pos}.{suffix}"] = value
    return out

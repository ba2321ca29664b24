"""A call on a pruned cache (a decode step, a later turn): the mask and positions its language model gets.

The caller's 2-D mask and positions span the ORIGINAL sequence; the cache holds the pruned one. Each segment's
mask comes from `CachedPrefill.segment_mask` (device ops only: a decode step reads nothing back); on a ragged cache
(segments whose layers hold different slots, `engine/ragged.py`) every later segment gets its own 4-D causal mask,
handed to its layers by their hooks (`forward.layer_masks`). Rotary positions keep the policy: the true positions
("preserve", the caller's ids as they are) or renumbered ones ("compact": less the positions removed).
"""

from __future__ import annotations

import torch

from vlm_prune.adapters.base import Adapter
from vlm_prune.engine.batch import to_device
from vlm_prune.engine.cached import CachedPrefill
from vlm_prune.engine.calls import rope_view
from vlm_prune.engine.forward_state import _Forward
from vlm_prune.errors import InputError


def continue_forward(
    kwargs: dict,
    cached: CachedPrefill,
    cache,
    past: int,
    adapter: Adapter,
    position_policy: str,
    rotary_as_given: bool,
    plain_rope: bool,
    decode_columns: torch.Tensor | None,
) -> tuple[_Forward, torch.Tensor | None]:
    """(the forward state of this call, what the rotary embedding gets if it is the caller's ids as they are, else
    None: then `forward.rope`).

    past: the cached length of the first segment's layers; rotary_as_given: the rotary embedding can take the
    caller's 2-D position ids unchanged (plain RoPE, policy "preserve"); plain_rope: the adapter's rope positions
    are the caller's ids expanded; decode_columns: the (B, q) slot columns of the previous step, reused while the
    shape repeats (the state's `columns`).
    """
    embeds: torch.Tensor = kwargs["inputs_embeds"]
    device = embeds.device
    batch, q_len = embeds.shape[:2]
    appended = past - cached.segments[0][1].shape[1]
    virtual_past = cached.original_length + appended  # (`cached.virtual_past(past)`, inline: every step)
    user_mask = kwargs.get("attention_mask")
    if user_mask is not None and (user_mask.ndim != 2 or user_mask.shape[1] != virtual_past + q_len):
        if user_mask.ndim != 2:
            raise InputError("after a pruned prefill, pass a 2-D attention mask (or none)")
        raise InputError(
            f"attention_mask spans {user_mask.shape[1]} tokens, but the unpruned sequence so far is "
            f"{virtual_past + q_len}; pass the mask over the ORIGINAL sequence, as generate() does"
        )

    ids = kwargs.get("position_ids")
    rotary = None
    if rotary_as_given and isinstance(ids, torch.Tensor) and ids.ndim == 2 and ids.device == device:
        rope = rotary = ids  # the rotary embedding gets the caller's ids as they are (rope[0] would be `ids`)
    else:
        rope = rope_view(ids, adapter.rope_rows, device) if plain_rope else None
        if rope is None:
            rope = to_device(adapter.rope_positions(ids, batch, q_len, virtual_past), device)
        if position_policy == "compact":
            rope = rope - cached.shift.to(device).view(1, -1, 1)
    if decode_columns is None or decode_columns.shape != (batch, q_len) or decode_columns.device != device:
        decode_columns = torch.arange(q_len, device=device).expand(batch, -1)
    tail = appended + q_len  # slots after each segment's cached prefill slots (`CachedPrefill.segment_mask`)
    forward = _Forward.decode(decode_columns, cached.segment_mask(0, user_mask, batch, tail, device), rope)
    if len(cached.segments) > 1:
        from transformers.masking_utils import create_causal_mask

        bounds = [layer for layer, _ in cached.segments[1:]] + [len(adapter.layers)]
        for index, (layer, _) in enumerate(cached.segments[1:], start=1):
            mask = create_causal_mask(
                config=adapter.text_config,
                inputs_embeds=embeds,
                attention_mask=cached.segment_mask(index, user_mask, batch, tail, device),
                cache=cache,
                position_ids=None,
                layer_idx=layer,
            )
            for covered in range(layer, bounds[index]):
                forward.layer_masks[covered] = mask
    return forward, rotary

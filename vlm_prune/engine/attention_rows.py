"""Attention rows for a few query tokens, recomputed from q/k: no eager attention, no `output_attentions`.

In-LLM methods (FastV, AdaptInfer, CATP, PruneVid, ...) score visual tokens by the attention a few
query tokens (the last token, the text after the media) pay to them in decoder layer k-1. The
authors' code materialises the whole (H, L, L) matrix with eager attention. We only need Q rows:
recompute q for those Q tokens from the attention module's own input, take the keys (recomputed
here, or the ones the layer already wrote to its cache), apply the same RoPE, and softmax Q x L
logits. That works whatever the attention implementation (sdpa, flash-attention-2) and costs
O(H * Q * L).

`recompute_attention_rows` mirrors the decoder attention modules of transformers 5.x:
- q_proj/k_proj with or without biases (Qwen2 has q/k/v biases);
- per-head q_norm/k_norm when the module has them (Qwen3, applied before RoPE, as in the model);
- RoPE with the (cos, sin) the model's `rotary_emb` computed, applied with rotate-half exactly as
  `apply_rotary_pos_emb`, including partial rotary (cos narrower than head_dim);
- M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL): in transformers 5.x the rotary embedding module already
  recomposes the (t, h, w) sections (`mrope_section`) into one (B, L, head_dim) cos/sin pair and the
  attention applies plain `apply_rotary_pos_emb`, so nothing special is needed. For the older
  layout (cos/sin of shape (3, B, L, head_dim), used by transformers 4.x's
  `apply_multimodal_rotary_pos_emb`) we recompose the sections here from the module's
  `rope_parameters`/`rope_scaling` "mrope_section" (or the `mrope_section` argument);
- GQA (keys repeated per query group);
- the module's own `scaling` (Gemma's query_pre_attn_scalar), optional logit soft-capping
  (`config.attn_logit_softcapping`), the causal mask, padding (`key_mask`) and a sliding window
  (`module.sliding_window`, measured in sequence indices, like transformers' mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the last dimension: (x1, x2) -> (-x2, x1), as transformers' `rotate_half`."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, S, d) with cos/sin (B or 1, S, r), r <= d (partial rotary rotates the first r dims)."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def _module_mrope_section(module: nn.Module) -> list[int] | None:
    for owner in (module, getattr(module, "config", None)):
        if owner is None:
            continue
        for attr in ("rope_parameters", "rope_scaling"):
            params = getattr(owner, attr, None)
            if isinstance(params, dict) and params.get("mrope_section"):
                return list(params["mrope_section"])
    return None


def recompose_mrope(
    cos: torch.Tensor, sin: torch.Tensor, mrope_section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy M-RoPE layout (3, B, S, d) -> (B, S, d), as transformers 4.x `apply_multimodal_rotary_pos_emb`.

    Chunk i of the doubled section list takes its values from the temporal (i % 3 == 0), height (1)
    or width (2) row.
    """
    sections = list(mrope_section) * 2

    def merge(freq: torch.Tensor) -> torch.Tensor:
        return torch.cat([m[i % 3] for i, m in enumerate(freq.split(sections, dim=-1))], dim=-1)

    return merge(cos), merge(sin)


def _head_dim(module: nn.Module) -> int:
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        config = module.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim)


@torch.no_grad()
def project_keys(
    attn_module: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Keys as the module computes them: hidden_in (B, L, D) -> (B, H_kv, L, d) after k_norm and RoPE.

    This is what the layer stores in its KV cache (`cache.layers[i].keys`).
    """
    head_dim = _head_dim(attn_module)
    batch, length, _ = hidden_in.shape
    k = attn_module.k_proj(hidden_in).view(batch, length, -1, head_dim)
    k_norm = getattr(attn_module, "k_norm", None)
    if k_norm is not None:
        k = k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = _rope_tables(attn_module, position_embeddings, None)
    return apply_rope(k, cos, sin)


def _rope_tables(
    attn_module: nn.Module,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mrope_section: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = position_embeddings
    if cos.dim() == 4:  # legacy (3, B, S, d) M-RoPE tables
        section = mrope_section or _module_mrope_section(attn_module)
        if section is None:
            raise ValueError(
                "position embeddings of shape (3, B, L, d) need an mrope_section: pass mrope_section=... "
                "or use a module whose rope_parameters carry it"
            )
        cos, sin = recompose_mrope(cos, sin, section)
    if cos.dim() == 2:  # (S, d): shared by the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


@torch.no_grad()
def recompute_attention_rows(
    attn_module: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_mask: torch.Tensor | None,
    *,
    keys: torch.Tensor | None = None,
    mrope_section: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention probabilities of `query_index` rows over the whole sequence, recomputed from q/k.

    Args:
        attn_module: a decoder self-attention module of transformers 5.x (q_proj, k_proj, optional
            q_norm/k_norm, `head_dim`, `scaling`, optional `sliding_window`).
        hidden_in: (B, L, D) the INPUT of `attn_module` (i.e. after the decoder layer's
            input_layernorm), as a forward pre-hook on the attention module sees it.
        position_embeddings: (cos, sin), each (B or 1, L, r) as the model's rotary_emb returns them
            (r = head_dim, or less for partial rotary); the legacy M-RoPE layout (3, B, L, d) is
            recomposed with `mrope_section`.
        query_index: (Q,) long, indices into the sequence (same for every row of the batch).
        key_mask: (B, L) bool, True = a real token (False = padding), or None for no padding.
        keys: optional (B, H_kv, L, d) keys after k_norm and RoPE (what a full-attention layer cached);
            when given, k is not recomputed. Sliding-window caches keep only the window: pass None there.
        mrope_section: only for the legacy 4-D cos/sin layout.

    Returns:
        (B, H, Q, L) float32 probabilities: causal (key j <= query i), padding keys get 0, rows sum to 1.
        A query row whose keys are all masked (a padding query) is all zeros.
    """
    head_dim = _head_dim(attn_module)
    batch, length, _ = hidden_in.shape
    query_index = torch.as_tensor(query_index, dtype=torch.long, device=hidden_in.device).reshape(-1)
    num_q = query_index.numel()

    q = attn_module.q_proj(hidden_in[:, query_index]).view(batch, num_q, -1, head_dim)
    q_norm = getattr(attn_module, "q_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(1, 2)  # (B, H, Q, d)

    cos, sin = _rope_tables(attn_module, position_embeddings, mrope_section)
    q = apply_rope(q, cos[:, query_index], sin[:, query_index])

    if keys is None:
        keys = project_keys(attn_module, hidden_in, (cos, sin))
    elif keys.shape[-2] != length:
        raise ValueError(
            f"keys cover {keys.shape[-2]} positions but the sequence has {length} (a sliding-window cache keeps "
            "only the window): pass keys=None to recompute them"
        )
    num_heads, num_kv = q.shape[1], keys.shape[1]
    if num_heads != num_kv:
        keys = keys.repeat_interleave(num_heads // num_kv, dim=1)

    scaling = getattr(attn_module, "scaling", None) or head_dim**-0.5
    logits = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scaling  # (B, H, Q, L)
    softcap = getattr(getattr(attn_module, "config", None), "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap

    key_pos = torch.arange(length, device=hidden_in.device)
    allowed = key_pos[None, :] <= query_index[:, None]  # (Q, L) causal
    window = getattr(attn_module, "sliding_window", None)
    if window:
        allowed = allowed & (query_index[:, None] - key_pos[None, :] < int(window))
    allowed = allowed.unsqueeze(0).expand(batch, -1, -1)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=hidden_in.device, dtype=torch.bool)[:, None, :]
    allowed = allowed[:, None]  # (B, 1, Q, L)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


#: what the engine records of one decoder layer for attention rows: (layer index, its input hidden states
#: (B, L, D) before input_layernorm, its (cos, sin) position embeddings, the cache it wrote or None)
LayerInput = tuple[int, torch.Tensor, tuple[torch.Tensor, torch.Tensor], object]


Slots = torch.Tensor | slice


def recorded_layer(previous: LayerInput, current: LayerInput | None, layer: int | None) -> LayerInput | None:
    """What a stage recorded of decoder layer `layer` (None or k-1: `previous`; k: `current`), or None when that
    layer was not recorded."""
    if layer is None or layer == previous[0]:
        return previous
    if current is not None and layer == current[0]:
        return current
    return None


def cached_keys(recorded: LayerInput) -> torch.Tensor | None:
    """(B, H_kv, L, d) the keys the recorded layer just cached (after k_norm and RoPE) when they cover exactly its
    (B, L) input slots, else None (layer k has not run yet; a sliding-window cache keeps only the window)."""
    layer_index, hidden_in, _, cache = recorded
    if cache is None or len(cache.layers) <= layer_index:
        return None
    keys = getattr(cache.layers[layer_index], "keys", None)
    if isinstance(keys, torch.Tensor) and (keys.shape[0], keys.shape[-2]) == tuple(hidden_in.shape[:2]):
        return keys
    return None


def _layer_rows(layers: Sequence[nn.Module], recorded: LayerInput, row: int, valid_slots: Slots,
                query_index: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(H, Q, L) rows of the recorded layer for batch row `row`, at (Q,) query positions among `valid_slots` (the
    method's selection: nothing is computed before it asks)."""
    layer_index, hidden_in, (cos, sin), _ = recorded
    layer = layers[layer_index]
    slots = valid_slots if isinstance(valid_slots, slice) else valid_slots.to(hidden_in.device)
    keys = cached_keys(recorded)
    if keys is not None:
        keys = keys[row : row + 1, :, slots]
    normed = layer.input_layernorm(hidden_in[row : row + 1, slots])
    rope = (cos[row : row + 1, slots], sin[row : row + 1, slots])
    key_mask = torch.ones(1, normed.shape[1], dtype=torch.bool, device=normed.device)
    with torch.no_grad():
        rows = recompute_attention_rows(layer.self_attn, normed, rope, query_index, key_mask, keys=keys)
    return rows[0]


def _stage_rows(layers: Sequence[nn.Module], previous: LayerInput, current: LayerInput | None, row: int,
                valid_slots: Slots, query_index: torch.Tensor, layer: int | None = None) -> torch.Tensor:  # fmt: skip
    recorded = recorded_layer(previous, current, layer)
    if recorded is None:
        raise ValueError(f"attention rows of layer {layer} were not recorded for this stage")
    return _layer_rows(layers, recorded, row, valid_slots, query_index.to(previous[1].device))


def stage_rows_fn(
    layers: Sequence[nn.Module], previous: LayerInput, current: LayerInput | None, row: int, valid_slots: Slots
):
    """The `ctx.attention_fn` of one sample at an in-LLM stage on the input of decoder layer k.

    previous: what layer k-1 received (its cached keys are reused); current: the stage's own input to layer k
    (cache None: layer k has not run yet, so its keys are recomputed), or None when only k-1 is served.
    valid_slots: (L,) the sample's non-padding slots of the batch row, or a slice of them when they are one run (a
    view, no index tensor: the usual left-padded row). Returns `fn(query_index, layer=None)`:
    query_index (Q,) indexes the sample's sequence; layer None / k-1 or k; the result is (H, Q, L) float32.
    (One partial per row: the contexts of a batch are built on the hot path.) This is the per-row path: the engine's
    contexts serve host-int queries on one-run rows from `engine/stage_attention.py`, one recompute per batch.
    """
    return partial(_stage_rows, layers, previous, current, row, valid_slots)

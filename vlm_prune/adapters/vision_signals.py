"""Vision-tower signals for VisionZip-style methods, recomputed from one ViT layer's INPUT.

The tower is never asked for attention weights (`output_attentions` forces eager attention in the
whole tower, which is what made VisionZip's own Qwen port slower). An adapter hooks the INPUT of the
chosen layer (a forward pre-hook; for LLaVA that is the layer whose output feeds the projector,
`vision_feature_layer`, as VisionZip uses `attentions[-2]` with `hidden_states[-2]`) and calls one of
these functions, which redo only that layer's pre-norm and q/k projections:

- `clip_layer_cls_attention`: CLIP ViT (has a CLS token). The CLS query's attention over all 1+N keys
  (softmax over every key, CLS included), CLS column dropped, heads summed -> (B, N). Keys: the raw
  k_proj outputs of the N patches (before scaling), averaged over heads -> (B, N, d_head), exactly
  VisionZip's `metric = raw_key_states.mean(1)`.
- `vit_layer_mean_attention` (alias `siglip_layer_mean_attention`): towers without CLS (SigLIP). The
  documented fallback: the attention each patch RECEIVES, heads summed, averaged over all queries ->
  (B, N); keys head-averaged as above.
- `qwen2vl_block_mean_attention`: Qwen2-VL / Qwen2.5-VL vision blocks (no CLS, packed sequence of
  all images, attention restricted to the `cu_seqlens` chunks). Mean attention received per patch
  within its chunk, heads summed, with the block's own 2-D rotary applied to q and k as in
  `apply_rotary_pos_emb_vision` (pass `position_embeddings=None` to skip rotary, a documented
  approximation). Results are grouped per MERGED token (mean over the `spatial_merge_unit` = 2x2
  consecutive patches that the PatchMerger concatenates). Keys are the post-rotary keys with heads
  concatenated (H * d_head), as VisionZip's Qwen port stores them, averaged over the group. For
  Qwen2.5-VL the blocks see patches in window order: pass the tower's `window_index` and the outputs
  are put back in merged-token (LLM) order; hook a full-attention block (`fullatt_block_indexes`),
  otherwise "received" is measured within each window only.

All scores are float32. Queries are processed in chunks, so memory stays O(H * chunk * n).
"""

from __future__ import annotations

import torch
from torch import nn


def _scale(attn: nn.Module) -> float:
    for attr in ("scaling", "scale"):
        value = getattr(attn, attr, None)
        if value:
            return float(value)
    return float(attn.head_dim) ** -0.5


@torch.no_grad()
def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Attention received per key, heads summed, averaged over queries.

    q, k: (H, n, d). Returns (n,) float32: Σ_h mean_i softmax_j(q_i · k_j · scale)[j].
    """
    q, k = q.float(), k.float()
    n = q.shape[1]
    total = torch.zeros(k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        probs = torch.softmax(q[:, start : start + chunk] @ k.transpose(-1, -2) * scale, dim=-1)
        total += probs.sum(dim=(0, 1))
    return total / max(n, 1)


@torch.no_grad()
def clip_layer_cls_attention(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS -> patch attention of one CLIP encoder layer, from the layer's INPUT hidden states.

    layer: a `CLIPEncoderLayer` (layer_norm1, self_attn.{q_proj,k_proj,head_dim,scale}).
    hidden: (B, 1 + N, d), CLS first.
    Returns (cls_attn (B, N) float32, heads summed; keys (B, N, d_head), raw keys averaged over heads).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, seq, _ = normed.shape
    head_dim = int(attn.head_dim)
    q = attn.q_proj(normed[:, :1]).view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, H, 1, d)
    k = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)  # (B, H, S, d)
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * _scale(attn), dim=-1)
    cls_attn = probs[:, :, 0, 1:].sum(dim=1)
    keys = k[:, :, 1:].mean(dim=1)
    return cls_attn, keys


@torch.no_grad()
def vit_layer_mean_attention(
    layer: nn.Module, hidden: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention received per token of one ViT layer without CLS (SigLIP), from its INPUT.

    layer: a `SiglipEncoderLayer`/`CLIPEncoderLayer` (layer_norm1, self_attn.{q_proj,k_proj}).
    hidden: (B, N, d).
    Returns (received (B, N) float32, heads summed and averaged over queries; keys (B, N, d_head)
    averaged over heads).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, seq, _ = normed.shape
    head_dim = int(attn.head_dim)
    q = attn.q_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    scale = _scale(attn)
    received = torch.stack([received_attention(q[b], k[b], scale, chunk) for b in range(batch)])
    return received, k.mean(dim=1)


siglip_layer_mean_attention = vit_layer_mean_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def qwen2vl_block_mean_attention(
    block: nn.Module,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    spatial_merge_unit: int = 4,
    window_index: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention received per merged token of one Qwen2-VL/2.5-VL vision block, from its INPUT.

    block: `Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock` (norm1, attn.{qkv, num_heads}).
    hidden: (S, d) packed patches of every image/video in the batch (the block's input).
    cu_seqlens: (n + 1,) chunk boundaries the block attends within (what the block received).
    position_embeddings: (cos, sin), each (S, d_head) as the block received them, or None (no rotary).
    spatial_merge_unit: patches per merged token (merge_size² = 4).
    window_index: Qwen2.5-VL's (S / unit,) window permutation, when the blocks see window order.
    Returns (received (S / unit,) float32, heads summed; keys (S / unit, H * d_head)), in merged-token order.
    """
    attn = block.attn
    normed = block.norm1(hidden)
    seq = normed.shape[0]
    heads = int(attn.num_heads)
    q, k, _ = attn.qkv(normed).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    q, k = q.float(), k.float()
    if position_embeddings is not None:
        cos, sin = (t.float().unsqueeze(-2) for t in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    scale = _scale(attn)
    bounds = cu_seqlens.tolist()
    received = torch.zeros(seq, dtype=torch.float32, device=hidden.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
            received[start:end] = received_attention(qs, ks, scale, chunk)
    keys = k.reshape(seq, -1)
    received = received.view(-1, spatial_merge_unit).mean(dim=1)
    keys = keys.view(-1, spatial_merge_unit, keys.shape[-1]).mean(dim=1)
    if window_index is not None:
        reverse = torch.argsort(window_index.to(received.device))
        received, keys = received[reverse], keys[reverse]
    return received, keys

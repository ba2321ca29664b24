"""A hand-built reference for visual-token pruning that does not use vlm_prune's engine.

DESIGN invariants 3 and 4: for a fixed keep set over the visual tokens of one row,

1. `capture()` runs the UNWRAPPED model once and records what its language model receives: the
   `inputs_embeds` (the model's own vision tower + projector + scatter), the attention mask, the
   original rotary positions (1-D, or the 3 M-RoPE rows) and, for Qwen3-VL, the deepstack features.
2. `reference_row()` gathers the kept columns of one row (no padding at all) and runs the decoder
   layers by hand: it calls `rotary_emb` itself with the true (possibly gapped) positions and builds
   an explicit causal mask, so transformers' packed-sequence detection never sees the gapped positions.
   Pruning at layer k >= 1 runs layers < k on the full row and compacts hidden states, positions,
   deepstack residuals (and, with `trim_cache`, the caches of layers < k) at the input of layer k.
3. A manual greedy decode loop continues from the unpruned length (policy "preserve") or from the kept
   length (policy "compact": new position = original position - pruned tokens before it, on every
   M-RoPE row).

Everything is per row and unpadded: the batch invariant says a padded row must give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from vlm_prune.toy_models import IMAGE_ID, VIDEO_ID

VISUAL_IDS = (IMAGE_ID, VIDEO_ID)


def visual_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the placeholder tokens that are prunable visual tokens.

    Every image/video placeholder, except on LLaVA-OneVision the last token of each run of video tokens:
    the one newline the model appends per video is not part of any frame, and is never pruned (it stays a
    text token). The toy prompts separate videos by other tokens, so a run is one video.
    """
    visual = torch.isin(input_ids, torch.tensor(VISUAL_IDS, device=input_ids.device))
    if model is not None and model.config.model_type == "llava_onevision":
        video = input_ids == VIDEO_ID
        following = torch.cat([video[:, 1:], torch.zeros_like(video[:, :1])], dim=1)
        visual &= ~(video & ~following)
    return visual


@dataclass
class LLMInputs:
    """What the language model of an unwrapped model received in one call (whole batch).

    input_ids: (B, L). inputs_embeds: (B, L, D). attention_mask: (B, L) long (ones when the call had none).
    positions: (B, L) or (3, B, L) M-RoPE rotary positions (text-position row of Qwen's 4-row ids dropped).
    deepstack: Qwen3-VL per-level (N_visual_total, D) features added after decoder layer i, or None.
    visual_pos_masks: (B, L) bool, where the deepstack features go (Qwen3-VL), or None.
    visual: (B, L) bool, the prunable visual tokens (`visual_token_mask`).
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    deepstack: list[torch.Tensor] | None = None
    visual_pos_masks: torch.Tensor | None = None
    visual: torch.Tensor | None = None

    @property
    def mrope(self) -> bool:
        return self.positions.dim() == 3


def language_model(model):
    return model.model.language_model


def is_mrope(model) -> bool:
    return model.config.model_type.startswith("qwen")


@torch.no_grad()
def capture(model, inputs: dict, mode: str = "forward") -> LLMInputs:
    """Record the language model's input of the unwrapped `model` on `inputs`.

    mode="forward": as in `model(**inputs)` (LLaVA then uses arange positions over the padded row);
    mode="generate": as in the prefill of `model.generate(**inputs)` (padding-aware positions).
    """
    lm = language_model(model)
    seen: list[dict] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(dict(kwargs))

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if mode == "forward":
            model(**inputs, use_cache=False)
        elif mode == "generate":
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        else:
            raise ValueError(mode)
    finally:
        handle.remove()
    kw = seen[0]
    embeds = kw["inputs_embeds"].detach().clone()
    batch, length = embeds.shape[:2]
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    elif not torch.is_tensor(mask) or mask.dim() != 2:
        raise AssertionError("expected a 2D attention mask at the language model input")
    pos = kw.get("position_ids")
    mrope = is_mrope(model)
    if pos is None:
        pos = torch.arange(length, device=embeds.device)[None].expand(batch, -1)
        if mrope:
            pos = pos[None].expand(3, -1, -1)
    else:
        if mrope and pos.dim() == 3 and pos.shape[0] == 4:
            pos = pos[1:]
        elif mrope and pos.dim() == 2:
            pos = pos[None].expand(3, -1, -1)
        elif not mrope and pos.dim() == 2 and pos.shape[0] == 1 and batch > 1:
            pos = pos.expand(batch, -1)
    ds = kw.get("deepstack_visual_embeds")
    vpm = kw.get("visual_pos_masks")
    return LLMInputs(
        input_ids=inputs["input_ids"].clone(),
        inputs_embeds=embeds,
        attention_mask=mask.long().clone(),
        positions=pos.clone(),
        deepstack=None if ds is None else [d.detach().clone() for d in ds],
        visual_pos_masks=None if vpm is None else vpm.clone(),
        visual=visual_token_mask(model, inputs["input_ids"]),
    )


def visual_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model=None) -> list[int]:
    """Number of prunable visual tokens per row (padding excluded; see `visual_token_mask`)."""
    vis = visual_token_mask(model, input_ids)
    if attention_mask is not None:
        vis &= attention_mask.bool()
    return vis.sum(-1).tolist()


def pattern_mask(n: int, offset: int = 0) -> torch.Tensor:
    """A fixed, irregular keep mask over n visual tokens (~40% kept, never empty)."""
    j = torch.arange(n) + offset
    keep = ((j * 7 + 3) % 5) < 2
    if n and not keep.any():
        keep[0] = True
    return keep


def causal_mask(q: int, kv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, q, kv) additive mask: query j (absolute kv - q + j) sees keys 0..kv - q + j."""
    qi = torch.arange(q, device=device)[:, None] + (kv - q)
    ki = torch.arange(kv, device=device)[None, :]
    mask = torch.zeros(q, kv, dtype=dtype, device=device)
    mask.masked_fill_(ki > qi, torch.finfo(dtype).min)
    return mask[None, None]


def _rotary(lm, hidden: torch.Tensor, pos: torch.Tensor):
    """cos/sin for (q,) 1-D or (3, q) M-RoPE positions of one row."""
    if pos.dim() == 1:
        ids = pos[None]
    else:
        ids = pos[:, None, :]
    return lm.rotary_emb(hidden, ids)


def compact_positions(pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Positions of the kept tokens under policy "compact": original minus pruned tokens before it."""
    pruned = (~keep).long()
    before = torch.cumsum(pruned, 0) - pruned
    return (pos - before)[..., keep]


@dataclass
class RowRef:
    """Reference result for one row.

    kept_cols: (K,) column indices (in the padded batch layout of the captured inputs) of the tokens
        that remain after pruning, in order.
    logits: (K, V) prefill logits at those tokens.
    positions: rotary positions the kept tokens used in the layers after the (last) pruning stage.
    tokens: (T,) greedy tokens; step_logits: (T, V) the logits each was chosen from.
    cache_lengths: per decoder layer, the cache length after prefill.
    """

    kept_cols: torch.Tensor
    logits: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    step_logits: torch.Tensor | None = None
    cache_lengths: list[int] = field(default_factory=list)


@torch.no_grad()
def reference_row(
    model,
    cap: LLMInputs,
    row: int,
    keep_visual: torch.Tensor | None,
    *,
    layer: int = 0,
    policy: str = "preserve",
    trim_cache: bool = True,
    max_new_tokens: int = 0,
) -> RowRef:
    """Run row `row` of `cap` by hand with only the visual tokens in `keep_visual` kept.

    keep_visual: (N,) bool over the row's visual tokens in sequence order (None = keep all).
    layer: 0 = pre-LLM (compact inputs_embeds), k = compact at the input of decoder layer k.
    """
    if policy not in ("preserve", "compact"):
        raise ValueError(policy)
    lm = language_model(model)
    head = model.get_output_embeddings()
    layers = lm.layers
    cols = cap.attention_mask[row].bool().nonzero(as_tuple=True)[0]
    ids = cap.input_ids[row, cols]
    emb = cap.inputs_embeds[row, cols]
    pos = cap.positions[..., row, cols]
    n = cols.numel()
    vis = cap.visual[row, cols]
    n_vis = int(vis.sum())
    if keep_visual is None:
        keep_visual = torch.ones(n_vis, dtype=torch.bool)
    keep_visual = keep_visual.to(torch.bool).cpu()
    if keep_visual.numel() != n_vis:
        raise ValueError(f"keep mask has {keep_visual.numel()} entries, row {row} has {n_vis} visual tokens")
    keep = ~vis.cpu()
    keep[vis.cpu().nonzero(as_tuple=True)[0][keep_visual]] = True
    keep = keep.to(ids.device)

    # deepstack residuals of this row, in the row's visual order
    ds_rows = None
    if cap.deepstack is not None:
        vpm = cap.visual_pos_masks
        start = int(vpm[:row].sum())
        count = int(vpm[row].sum())
        ds_rows = [d[start:start + count] for d in cap.deepstack]
        ds_mask = vpm[row, cols]
        ds_order = torch.cumsum(ds_mask.long(), 0) - 1

    cache = DynamicCache(config=lm.config)
    cur = torch.arange(n, device=ids.device)  # local indices of the tokens in `h`
    h = emb[None]
    rot_pos = pos
    cos_sin = _rotary(lm, h, rot_pos)
    for i, dec in enumerate(layers):
        if i == layer:
            sel = keep[cur]
            h = h[:, sel]
            cur = cur[sel]
            rot_pos = compact_positions(pos, keep) if policy == "compact" else pos[..., keep]
            cos_sin = _rotary(lm, h, rot_pos)
        q = h.shape[1]
        mask = causal_mask(q, q, h.dtype, h.device)
        h = dec(
            h,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=torch.arange(q, device=h.device)[None],
            cache=cache,
            use_cache=True,
        )
        if ds_rows is not None and i < len(ds_rows):
            on = ds_mask[cur]
            if on.any():
                h = h.clone()
                h[0, on] = h[0, on] + ds_rows[i][ds_order[cur[on]]].to(h.dtype)
    if layer >= len(layers):
        raise ValueError("layer beyond the decoder")
    logits = head(lm.norm(h))[0]

    if trim_cache and layer > 0:
        for i in range(layer):
            lay = cache.layers[i]
            lay.keys = lay.keys[:, :, keep]
            lay.values = lay.values[:, :, keep]
    cache_lengths = [int(cache.layers[i].keys.shape[-2]) for i in range(len(layers))]

    ref = RowRef(kept_cols=cols[keep].cpu(), logits=logits, positions=rot_pos, cache_lengths=cache_lengths)
    if max_new_tokens <= 0:
        return ref

    last = pos[..., -1]
    next_pos = int(last.max()) + 1
    if policy == "compact":
        next_pos -= int((~keep).sum())
    tokens, step_logits = [], [logits[-1]]
    tok = int(logits[-1].argmax())
    for t in range(max_new_tokens):
        tokens.append(tok)
        if t == max_new_tokens - 1:
            break
        h = lm.embed_tokens(torch.tensor([[tok]], device=ids.device))
        p = torch.tensor([next_pos + t], device=ids.device)
        if cap.mrope:
            p = p[None].expand(3, 1)
        cs = _rotary(lm, h, p)
        for i, dec in enumerate(layers):
            kv = int(cache.layers[i].keys.shape[-2]) + 1
            h = dec(
                h,
                attention_mask=causal_mask(1, kv, h.dtype, h.device),
                position_embeddings=cs,
                position_ids=torch.tensor([[kv - 1]], device=h.device),
                cache=cache,
                use_cache=True,
            )
        lg = head(lm.norm(h))[0, -1]
        step_logits.append(lg)
        tok = int(lg.argmax())
    ref.tokens = torch.tensor(tokens)
    ref.step_logits = torch.stack(step_logits)
    return ref


def reference_batch(model, cap: LLMInputs, keep_visual: list[torch.Tensor | None], **kwargs) -> list[RowRef]:
    return [reference_row(model, cap, b, keep_visual[b], **kwargs) for b in range(cap.input_ids.shape[0])]


@torch.no_grad()
def reference_via_language_model(model, cap: LLMInputs, row: int, keep_visual: torch.Tensor | None):
    """Cross-check of `reference_row` at layer 0 through the language model's own forward.

    Feeds the compacted inputs_embeds, the true positions and an explicit all-ones mask to
    `model.model.language_model` (an explicit mask keeps the packed-sequence detection off).
    """
    lm = language_model(model)
    cols = cap.attention_mask[row].bool().nonzero(as_tuple=True)[0]
    ids = cap.input_ids[row, cols]
    vis = cap.visual[row, cols]
    keep = ~vis
    if keep_visual is None:
        keep_visual = torch.ones(int(vis.sum()), dtype=torch.bool)
    keep[vis.nonzero(as_tuple=True)[0][keep_visual.to(ids.device)]] = True
    emb = cap.inputs_embeds[row, cols][keep][None]
    pos = cap.positions[..., row, cols][..., keep]
    pos = pos[:, None, :] if cap.mrope else pos[None]
    kwargs = {}
    if cap.deepstack is not None:
        vpm = cap.visual_pos_masks
        start, count = int(vpm[:row].sum()), int(vpm[row].sum())
        kept_vis = keep_visual.to(ids.device)
        kwargs["deepstack_visual_embeds"] = [d[start:start + count][kept_vis] for d in cap.deepstack]
        kwargs["visual_pos_masks"] = vpm[row, cols][keep][None]
    out = lm(
        inputs_embeds=emb,
        attention_mask=torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device),
        position_ids=pos,
        use_cache=False,
        **kwargs,
    )
    return model.get_output_embeddings()(out.last_hidden_state)[0]


#: a tiny transformers SamConfig (64 px, patch 8) for segmenter tests: SamConfig(**TINY_SAM_CONFIG)
TINY_SAM_CONFIG = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=64,
                       patch_size=8, output_channels=32, global_attn_indexes=[1], window_size=2, num_pos_feats=16),
    prompt_encoder_config=dict(hidden_size=32, image_size=64, image_embedding_size=8),
    mask_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                             iou_head_hidden_dim=32),
)  # fmt: skip

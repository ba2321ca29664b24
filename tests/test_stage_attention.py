"""An in-LLM stage's attention rows come from one batched recompute (`engine/stage_attention.py`): each row's rows
equal the per-row recompute, one recompute serves every row, and the methods keep the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vlm_prune
from vlm_prune.engine import stage_attention
from vlm_prune.engine.attention_rows import recompute_attention_rows, stage_rows_fn
from vlm_prune.engine.stage_attention import StageAttention
from vlm_prune.methods.fastv import FastV, last_token_attention_scores
from vlm_prune.toy_models import build_tiny, make_inputs


def _recorded_layers(model, inputs, layer: int):
    """(layer k-1's LayerInput with its cache, layer k's LayerInput without) of one forward of the unwrapped model:
    the inputs the engine records for a stage at layer k (hidden before input_layernorm, cos/sin, cache)."""
    from vlm_prune.adapters import adapter_for

    layers = adapter_for(model).layers
    seen = {}

    def grab(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            # (B, L, r) as the engine's position ids of B rows give them (unwrapped, they may be (1, L, r))
            cos_sin = tuple(t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"])
            seen[index] = (index, hidden, cos_sin, cache)

        return hook

    hooks = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (layer - 1, layer)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    previous = seen[layer - 1]
    current = (layer, seen[layer][1], seen[layer][2], None)
    return layers, previous, current


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batched_rows_equal_each_rows_own_recompute(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, padding="left", prompt_lengths=[3, 9, 6])
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # ragged rows: the padding is really masked
    layers, previous, current = _recorded_layers(model, inputs, layer=2)
    attention = StageAttention(layers, previous, current, mask)
    length = mask.shape[1]
    for layer_index in (1, 2):  # k-1 (keys from its cache) and k (keys recomputed)
        for row in range(3):
            first = int((mask[row] == 0).sum())
            n = length - first
            for query in (n - 1, n // 2):
                got = attention.rows(row, first, (query,), layer_index)
                per_row = stage_rows_fn(layers, previous, current, row, slice(first, length))
                want = per_row(torch.tensor([query]), layer_index)
                assert got.shape == want.shape == (want.shape[0], 1, n)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                assert torch.allclose(got.sum(-1), torch.ones(()))  # the padding took no probability
    # the row's last token: one recompute per layer serves every row (same padded slot L-1)
    assert sum(1 for layer_index, slots in attention._memo if slots == (length - 1,)) == 2


def test_batch_rows_mask_padding_as_an_independent_softmax_does():
    """Hand-built: the batched probabilities over a padded row equal eager softmax of q.k over the real keys."""
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left", prompt_lengths=[2, 8])
    layers, previous, _ = _recorded_layers(model, inputs, layer=2)
    mask = inputs["attention_mask"]
    rows = stage_attention.batch_rows(layers, previous, (mask.shape[1] - 1,), mask)  # (B, H, 1, L)
    attn = layers[1].self_attn
    for row in range(2):
        first = int((mask[row] == 0).sum())
        hidden = layers[1].input_layernorm(previous[1][row : row + 1, first:])
        cos, sin = (t[row : row + 1, first:] for t in previous[2])
        alone = recompute_attention_rows(attn, hidden, (cos, sin), torch.tensor([hidden.shape[1] - 1]), None)
        assert torch.equal(rows[row, :, :, :first], torch.zeros_like(rows[row, :, :, :first]))
        torch.testing.assert_close(rows[row, :, :, first:], alone[0], rtol=1e-5, atol=1e-6)


@dataclass
class PerRowFastV(FastV):
    """FastV asking with a tensor query: the engine's per-row path (the oracle of the batched one)."""

    name = "fastv_per_row"

    def score(self, ctx):
        return last_token_attention_scores(ctx.attention_rows(torch.tensor([ctx.last_index])), ctx.visual_index)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_fastv_keeps_the_same_tokens_batched_and_per_row(family, monkeypatch):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=4, padding="left", prompt_lengths=[3, 9, 6, 4])
    calls = []
    original = stage_attention.batch_rows
    monkeypatch.setattr(stage_attention, "batch_rows", lambda *a: (calls.append(a[2]), original(*a))[1])
    kept = {}
    for method in (FastV(keep=0.25), PerRowFastV(keep=0.25)):
        with vlm_prune.pruned(model, method) as handle, torch.no_grad():
            logits = model(**inputs).logits
            kept[method.name] = (handle.last_kept_index.clone(), logits)
    assert len(calls) == 1  # FastV: one batched recompute for 4 rows; the tensor query never takes it
    assert torch.equal(kept["fastv"][0], kept["fastv_per_row"][0])
    torch.testing.assert_close(kept["fastv"][1], kept["fastv_per_row"][1])


def test_rows_fall_back_when_the_layer_or_the_shapes_are_not_recorded():
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left", prompt_lengths=[2, 5])
    layers, previous, current = _recorded_layers(model, inputs, layer=2)
    mask = inputs["attention_mask"]
    assert StageAttention(layers, previous, None, mask).rows(0, 3, (0,), 2) is None  # layer k not recorded
    assert StageAttention(layers, previous, current, mask).rows(0, 3, (0,), 0) is None  # not a stage layer
    assert StageAttention(layers, previous, current, mask[:, 1:]).rows(0, 3, (0,), 1) is None  # other slots

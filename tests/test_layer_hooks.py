"""Decoder-layer hooks are attached for the forward that needs them only (`engine/layer_hooks.py`): a prefill with
in-LLM stages and a decode step on a ragged cache; plain decode steps run with no hook on any decoder layer."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.engine.layer_hooks import LayerHooks
from vlm_prune.toy_models import build_tiny, make_inputs


def _hooked(model) -> list[int]:
    """Indices of the decoder layers that hold a forward pre-hook now."""
    from vlm_prune.adapters import adapter_for

    return [index for index, layer in enumerate(adapter_for(model).layers) if layer._forward_pre_hooks]


def _record_layers_per_forward(model, handle) -> list[list[int]]:
    """Per top-level forward: the hooked decoder layers while its language model runs (read at the last layer)."""
    seen = []
    last = handle.adapter.layers[-1]
    probe = last.register_forward_hook(lambda module, args, output: seen[-1].append(_hooked(model)))
    start = model.register_forward_pre_hook(lambda module, args: seen.append([]), prepend=True)
    return seen, (probe, start)


@pytest.mark.parametrize("trim_cache", [True, False])
def test_layer_hooks_run_in_the_prefill_and_on_ragged_decode_steps_only(trim_cache):
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2)
    with vlm_prune.pruned(model, "fastv", keep=0.25, trim_cache=trim_cache) as handle, torch.no_grad():
        assert _hooked(model) == []  # nothing attached between forwards
        seen, hooks = _record_layers_per_forward(model, handle)
        try:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        finally:
            for hook in hooks:
                hook.remove()
        assert _hooked(model) == []
    stage_layer = handle.stages[0].layer
    every = list(range(stage_layer - 1, len(handle.adapter.layers)))  # FastV reads layer k-1's attention rows
    assert seen[0] == [every]  # the prefill: every hooked layer attached
    # decode: on a trimmed (uniform) cache no layer hook; untrimmed, the layers from the stage on get their masks
    expected = [] if trim_cache else list(range(stage_layer, len(handle.adapter.layers)))
    assert seen[1:] == [[expected], [expected]]


def test_a_forward_that_raises_leaves_no_layer_hook_behind():
    model = build_tiny("llava")
    inputs = make_inputs(model)
    with vlm_prune.pruned(model, "fastv", keep=0.25) as handle, torch.no_grad():
        boom = handle.adapter.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(**inputs)
        boom.remove()
        assert _hooked(model) == []  # the top-level post-hook (always called) detached them
        reference = model(**inputs).logits  # and the next forward prunes as before
    with vlm_prune.pruned(model, "fastv", keep=0.25), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    assert _hooked(model) == []


def test_layer_hooks_attach_what_the_table_holds_and_replace_what_was_attached():
    layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)])
    calls = []

    def hook_for(index):
        return lambda module, args, kwargs: calls.append(index)

    hooks = LayerHooks(layers, {2: hook_for(2), 3: hook_for(3)})
    hooks.attach()
    for layer in layers:
        layer(torch.zeros(1))
    assert calls == [2, 3] and hooks.attached
    hooks.hooks[3] = hook_for(30)  # a wrapper put in the table is what the next attach registers
    hooks.attach([3, 1, 3])  # (layers without a hook are skipped; duplicates once)
    calls.clear()
    for layer in layers:
        layer(torch.zeros(1))
    assert calls == [30]
    hooks.detach()
    assert not hooks.attached and all(not layer._forward_pre_hooks for layer in layers)
    hooks.detach()  # (idempotent)

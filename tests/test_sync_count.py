"""The engine's device->host syncs: one read of the inputs per prefill, one per stage, none per decode step.

`vlm_prune.engine.syncs` marks the inputs as device tensors and counts every host read of a marked tensor made
inside the handle's hooks (outside the methods' `select`). Here it runs around one generate() call with two new
tokens: the prefill and one decode step, for a pre-LLM and an in-LLM method, batch 1 and 3, LLaVA and Qwen2-VL.
A per-row `.item()` added anywhere in the hooks makes these tests fail (`test_a_per_row_read_is_counted`).
"""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.engine.syncs import OnDevice, SyncCounter, on_device
from vlm_prune.toy_models import build_tiny, make_inputs

torch.set_num_threads(1)


class TopNorm(vlm_prune.Method):
    """Keeps the budget's largest-norm tokens: a mask computed on the device, as most methods do."""

    layer = 0
    name = "top-norm"

    def select(self, ctx):
        order = ctx.visual_features.float().norm(dim=-1).topk(ctx.budget).indices
        keep = torch.zeros(ctx.num_visual, dtype=torch.bool, device=ctx.visual_features.device)
        return keep.index_fill(0, order, True)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny(family)
        return cache[family]

    return get


def count_per_forward(model, handle, inputs) -> tuple[list[int], list[str]]:
    """Syncs before the first forward, in the prefill and in the decode step of a 2-token generate()."""
    counts = []
    with SyncCounter(handle) as counter:
        timer = model.register_forward_pre_hook(lambda module, args: counts.append(counter.count), prepend=True)
        try:
            model.generate(**on_device(inputs), max_new_tokens=2, min_new_tokens=2, do_sample=False)
        finally:
            timer.remove()
        counts.append(counter.count)
        where = [f"{sync.call} at {sync.where}" for sync in counter.syncs]
    return [counts[0]] + [b - a for a, b in zip(counts, counts[1:])], where


CASES = [("top-norm", {}), ("fastv", {"layer": 2})]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method,options", CASES, ids=[name for name, _ in CASES])
def test_one_read_per_stage_and_none_per_decode_step(models, family, batch, method, options):
    model = models(family)
    inputs = make_inputs(model, batch=batch)
    chosen = TopNorm() if method == "top-norm" else method
    with vlm_prune.pruned(model, chosen, keep=0.25, **options) as handle, torch.no_grad():
        (encode, prefill, decode), where = count_per_forward(model, handle, inputs)
        stages = len(handle.stages)
        assert handle.stats.visual_tokens_out < handle.stats.visual_tokens_in  # it did prune
    # generate() runs the vision tower before the prefill: Qwen's adapter records the grids there (one read)
    assert encode <= (1 if family.startswith("qwen") else 0), where
    assert prefill <= 1 + stages, where  # the inputs (ids, mask, grids) once, then each stage's keep masks
    assert decode == 0, where


def test_the_counter_sees_the_reads_it_must(models):
    """Each kind of host read of a marked tensor is counted inside a hook, none outside one."""
    model = models("llava")
    with vlm_prune.pruned(model, "random", keep=0.5) as handle:
        x = on_device(torch.arange(6))
        host = x.cpu()  # outside a counter
        with SyncCounter(handle) as counter:
            x.sum().item(), x.tolist(), x.cpu(), bool(x.any())  # outside every hook: not the engine's
            assert counter.count == 0
            counter._depth += 1  # as inside a hook
            try:
                x.sum().item()
                x.tolist()
                assert type(x.cpu()) is torch.Tensor  # the host copy is unmarked
                bool(x.any())
                int(x[0])
                x[x > 2]
                x.nonzero()
                torch.equal(x, x)
                assert counter.count == 8, counter.syncs
                x[x > 2] = 0  # a masked_fill: no read
                host.sum().item(), host.nonzero()  # host bookkeeping: no read
                (x + 1).index_select(0, torch.tensor([0]))  # device ops: no read
                assert counter.count == 8
            finally:
                counter._depth -= 1
    assert isinstance(x + 1, OnDevice)


def test_a_per_row_read_is_counted(models):
    """A per-row `.item()` in the engine's hot path shows up in the count and breaks the bound above."""
    model = models("llava")
    inputs = make_inputs(model, batch=3)
    with vlm_prune.pruned(model, TopNorm(), keep=0.25) as handle, torch.no_grad():
        original, selects = handle._run_stage, [stage.select for stage in handle.stages]

        def with_row_reads(stage, hidden, **kwargs):
            for row in range(hidden.shape[0]):
                hidden[row, 0, 0].item()  # the regression this file guards against
            return original(stage, hidden, **kwargs)

        handle._run_stage = with_row_reads  # this instance only
        try:
            (_, prefill, _), _ = count_per_forward(model, handle, inputs)
        finally:
            del handle._run_stage
        assert prefill > 1 + len(handle.stages)
        (_, clean, _), _ = count_per_forward(model, handle, inputs)
        assert clean <= 1 + len(handle.stages)
        assert [stage.select for stage in handle.stages] == selects  # restored after each count


def test_the_counter_restores_the_hooks_on_error(models):
    model = models("llava")
    inputs = make_inputs(model)
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        hooks = {hook.id: hook.hooks_dict_ref()[hook.id] for hook in handle._hooks}
        layer_hooks = dict(handle._layers.hooks)
        selects = [stage.select for stage in handle.stages]
        with pytest.raises(RuntimeError, match="boom"), SyncCounter(handle):
            raise RuntimeError("boom")
        assert {hook.id: hook.hooks_dict_ref()[hook.id] for hook in handle._hooks} == hooks
        assert handle._layers.hooks == layer_hooks
        assert [stage.select for stage in handle.stages] == selects
        model(**inputs)  # still works

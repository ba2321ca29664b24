"""Every registered method through the engine on every adapter: exact budgets, batch rows equal rows alone,
determinism and clean removal."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.methods import get_method
from vlm_prune.toy_models import VIDEO_FAMILIES, build_tiny, make_inputs, single_row

FAMILIES = ["llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Not every signal exists on every family; these combinations must refuse with a PruneError at apply().
UNSUPPORTED = {("zoo", "llava_next"), ("visionzip", "llava_next"), ("visionzip", "qwen3_vl")}
UNSUPPORTED |= {(m, f) for m in ("zoo", "visionzip") for f in ("llava_onevision", "llava_next_video")}
UNSUPPORTED |= {("lvlm-csp", "qwen3_vl")}  # 4 toy layers leave no s1 < s2 after the deepstack layers
UNSUPPORTED |= {("catp", "qwen3_vl")}  # CATP needs layers K and K+1 after the deepstack layers: 4 toy layers have none
MULTI_IMAGE = {"catp"}  # few-shot methods: prompts of several images (a single image is a clear error)
OPTIONS = {"fastv": {"keep": 0.5}, "adaptinfer": {"keep": 0.5}, "visionzip": {"keep": 4}}


def method_names() -> list[str]:
    return sorted(vlm_prune.methods())


@pytest.fixture(scope="module")
def tiny():
    built: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny(family)
        return built[family]

    return get


def _options(name: str, family: str) -> dict:
    options = dict(OPTIONS.get(name, {"keep": 0.5}))
    if family == "qwen3_vl" and name == "prunevid":
        options["layer"] = 3  # after Qwen3-VL's deepstack layers
    if family == "qwen3_vl" and name in ("fastv", "adaptinfer", "adatoken3d"):
        # the 4-layer toy's default stages (layers 1-3) fall inside Qwen3-VL's 3 deepstack layers
        options["layer" if name == "fastv" else "layers"] = 3 if name == "fastv" else [3]
        if name in ("adaptinfer", "adatoken3d"):
            options["ratios"] = [0.5]
            options.pop("keep")
    return options


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", method_names())
def test_method_on_adapter(tiny, family, name):
    model = tiny(family)
    options = _options(name, family)
    if (name, family) in UNSUPPORTED:
        with pytest.raises(vlm_prune.PruneError):
            handle = vlm_prune.apply(model, name, **options)
            with torch.no_grad():
                model(**make_inputs(model))
            handle.remove()
        assert not model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks
        return
    inputs = make_inputs(model, batch=2, padding="left", num_images=3 if name in MULTI_IMAGE else 1)
    if get_method(name).media == "video":
        if family not in VIDEO_FAMILIES:
            with vlm_prune.pruned(model, name, **options), pytest.raises(vlm_prune.errors.MediaKindError):
                model(**inputs)  # an image-only family: the same clear error
            return
        with vlm_prune.pruned(model, name, **options), pytest.raises(vlm_prune.errors.MediaKindError):
            model(**inputs)  # image-only input: a clear error naming image methods
        inputs = make_inputs(model, batch=2, padding="left", video=True, num_images=1, video_grid=(4, 8, 8))
    with torch.no_grad():
        baseline = model(**inputs).logits
    with vlm_prune.pruned(model, name, **options) as handle, torch.no_grad():
        batched = model(**inputs).logits
        kept_batch = handle.last_kept_index.clone()
        stats = handle.stats
        again = model(**inputs).logits
        assert torch.equal(batched, again), "same inputs, same seed: same result"
        assert torch.equal(handle.last_kept_index, kept_batch)
        for row in range(2):
            alone = model(**single_row(inputs, row)).logits[0]
            kept_alone = handle.last_kept_index[0]
            mine = kept_batch[row][kept_batch[row] >= 0]
            offset = int((inputs["attention_mask"][row] == 0).sum())  # left padding of the original row
            assert torch.equal(mine[mine >= offset] - offset, kept_alone), "same tokens kept as the row alone"
            torch.testing.assert_close(batched[row, -alone.shape[0] :], alone, rtol=1e-4, atol=1e-4)
    # exact budgets: every stage's output count per media item equals the requested count
    for stage in stats.stages:
        for before, after in zip(stage.tokens_in, stage.tokens_out):
            # stages never grow, except LVLM_CSP's scatter (re-entry), which brings every token back
            grown = stage.name == "lvlm_csp.scatter"
            assert all(a <= b for a, b in zip(after, before)) or grown
    if name in ("random", "divprune", "zoo", "pool"):
        from vlm_prune.engine.budget import tokens_to_keep

        (stage,) = stats.stages
        for before, after in zip(stage.tokens_in, stage.tokens_out):
            assert after == [tokens_to_keep(0.5, b, b) for b in before]
    assert stats.visual_tokens_out < stats.visual_tokens_in
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, baseline), "removal restores the model bit for bit"


@pytest.mark.parametrize("family", [f for f in FAMILIES if ("zoo", f) not in UNSUPPORTED])  # no projector signal
def test_zoo_default_estimator_runs_the_closed_form_on_every_adapter(family):
    """Every adapter with a projector signal has an activation -> Linear tail, so ZOO's default closed-form
    estimator is used (not the exact fallback), and its scores equal the closed form on the engine's inputs."""
    from vlm_prune.methods.zoo import ZOOPrune, gram_matrix, zo_sensitivity_moment

    model = build_tiny(family)
    inputs = make_inputs(model)
    method = ZOOPrune(keep=0.5, num_directions=8)
    seen = {}
    original = method.sensitivity

    def recording(ctx):
        seen["ctx"], seen["scores"] = ctx, original(ctx)
        return seen["scores"]

    method.sensitivity = recording
    with vlm_prune.pruned(model, method), torch.no_grad():
        model(**inputs)
    (entry,) = method._gram_cache.values()
    assert entry is not None, "the closed-form estimator fell back to the exact one"
    ctx = seen["ctx"]
    weight, bias = ctx.projector_first
    activation, last = ctx.projector_tail[:-1], ctx.projector_tail[-1]
    expected = zo_sensitivity_moment(
        ctx.projector_inputs, weight, bias, activation, gram_matrix(last.weight), 8, generator=ctx.generator()
    )
    torch.testing.assert_close(seen["scores"], expected)

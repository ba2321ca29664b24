"""DESIGN.md invariants, through the public API only, on every toy family.

Parametrized over families x attention (eager, sdpa) x layout (batch 1, batch 2 left-padded, batch 2
right-padded). The pruned results are compared with `tests/reference.py`, a hand-built reference that
does not use the engine. Generation is compared on left-padded / unpadded batches only: with right
padding `generate()` itself appends after the pads, so there is nothing meaningful to compare.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    capture,
    pattern_mask,
    reference_row,
    reference_via_language_model,
    visual_counts,
)

import vlm_prune
from vlm_prune.toy_models import VIDEO_FAMILIES, available_families, build_tiny, make_inputs, single_row

FAMILIES = available_families()
VIDEO_CAPABLE = [family for family in FAMILIES if family in VIDEO_FAMILIES]
# the prompts holding video: alone, after an image, before an image (vLLM bug #27859 was the mixed case)
VIDEO_MEDIA = {
    "video": dict(video=True, num_images=0),
    "image+video": dict(video=True),
    "video+image": dict(video=True, video_first=True),
}
ATTNS = ("eager", "sdpa")
LAYOUTS = [(1, "left"), (2, "left"), (2, "right")]
LAYOUT_IDS = ["b1", "b2-left", "b2-right"]
NEW_TOKENS = 4
TOL = dict(atol=2e-5, rtol=1e-4)
IDENTITY_TOL = dict(atol=1e-5, rtol=1e-5)

torch.set_num_threads(1)  # tiny matrices: threads only add contention


# ------------------------------------------------------------------------------------------------------
# user methods: the minimal public contract (class attribute `layer`, `select(ctx)` -> bool mask)
# ------------------------------------------------------------------------------------------------------

class KeepAll(vlm_prune.Method):
    layer = 0

    def select(self, ctx):
        return torch.ones(ctx.num_visual, dtype=torch.bool)


class Pattern(vlm_prune.Method):
    """A fixed, irregular ~40% keep set over the sample's visual tokens in sequence order."""

    layer = 0

    def select(self, ctx):
        return pattern_mask(ctx.num_visual)


class SeededRandom(vlm_prune.Method):
    layer = 0

    def select(self, ctx):
        return torch.rand(ctx.num_visual, generator=ctx.generator()) < 0.5


class Boom(vlm_prune.Method):
    layer = 0

    def select(self, ctx):
        raise RuntimeError("boom from select")


def in_llm_layer(family: str) -> int:
    """The in-LLM stage layer used for `family`.

    2 everywhere, except Qwen3-VL: its deepstack adds vision features after decoder layers 0..2 and the
    engine only allows in-LLM stages after them (layer >= 3); see test_qwen3_deepstack_layer_stage.
    """
    return 3 if family == "qwen3_vl" else 2


def _at(base: type, layer: int) -> type:
    return type(f"{base.__name__}At{layer}", (base,), {"layer": layer})


def pattern_method(layer: int) -> vlm_prune.Method:
    return (Pattern if layer == 0 else _at(Pattern, layer))()


def keep_all_method(layer: int) -> vlm_prune.Method:
    return (KeepAll if layer == 0 else _at(KeepAll, layer))()


def stage_layer(family: str, stage: str) -> int:
    return 0 if stage == "pre" else in_llm_layer(family)


STAGES = ["pre", "llm"]


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------

_MODELS: dict = {}


def model_for(family: str, attn: str, seed: int = 0):
    key = (family, attn, seed)
    if key not in _MODELS:
        _MODELS[key] = build_tiny(family, attn_implementation=attn, seed=seed)
    return _MODELS[key]


def inputs_for(model, batch: int, padding: str, **kw) -> dict:
    return make_inputs(model, batch=batch, padding=padding, **kw)


@torch.no_grad()
def forward(model, inputs, **kw):
    return model(**inputs, **kw)


@torch.no_grad()
def generate(model, inputs, n=NEW_TOKENS):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, torch.stack(out.logits, dim=1)  # (B, T), (B, T, V)


def cache_of(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return cache


def pattern_keeps(inputs, model) -> list[torch.Tensor]:
    return [pattern_mask(n) for n in visual_counts(inputs["input_ids"], inputs["attention_mask"], model)]


def kept_index(handle) -> torch.Tensor:
    idx = getattr(handle, "last_kept_index", None)
    assert idx is not None, "handle.last_kept_index is missing (engine must expose it after a pruned prefill)"
    return idx


def real_slots(index: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L_kept) bool: slots holding a real token (not a pad the engine added, not an original pad)."""
    valid = index >= 0
    if attention_mask is not None:
        valid &= attention_mask.bool().gather(1, index.clamp(min=0).to(attention_mask.device)).to(valid.device)
    return valid


def assert_matches_reference(logits, index, refs, attention_mask=None, tol=TOL):
    """Pruned prefill logits (B, L_kept, V) vs per-row references, aligned by handle.last_kept_index."""
    assert index.shape == logits.shape[:2], (tuple(index.shape), tuple(logits.shape))
    real = real_slots(index, attention_mask)
    for b, ref in enumerate(refs):
        valid = real[b]
        got_cols = index[b][valid].cpu()
        assert torch.equal(got_cols, ref.kept_cols), f"row {b}: kept columns {got_cols} != {ref.kept_cols}"
        torch.testing.assert_close(logits[b][valid], ref.logits, **tol)


def assert_generation_matches(new, step_logits, refs, tol=TOL):
    for b, ref in enumerate(refs):
        assert new[b].tolist() == ref.tokens.tolist(), f"row {b}: {new[b].tolist()} != {ref.tokens.tolist()}"
        torch.testing.assert_close(step_logits[b], ref.step_logits, **tol)


def hook_snapshot(model) -> dict:
    snap = {}
    for name, module in model.named_modules():
        snap[name] = (
            tuple(module._forward_hooks.keys()),
            tuple(module._forward_pre_hooks.keys()),
            tuple(module._backward_hooks.keys()),
            tuple(module._backward_pre_hooks.keys()),
            tuple(sorted(k for k in vars(module) if not k.startswith("_"))),
            "forward" in vars(module),
        )
    return snap


def global_hooks() -> tuple:
    m = torch.nn.modules.module
    return (
        len(m._global_forward_hooks),
        len(m._global_forward_pre_hooks),
        len(m._global_backward_hooks),
    )


matrix = pytest.mark.parametrize(
    "family,attn,layout",
    [(f, a, lay) for f in FAMILIES for a in ATTNS for lay in LAYOUTS],
    ids=[f"{f}-{a}-{i}" for f in FAMILIES for a in ATTNS for i in LAYOUT_IDS],
)


# ------------------------------------------------------------------------------------------------------
# the reference itself (no engine): keep-all reference == the model; partial keep == LM forward path
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_reference_self_check(family):
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    full = forward(model, inputs).logits
    cap = capture(model, inputs, "forward")
    capg = capture(model, inputs, "generate")
    new, _ = generate(model, inputs)
    for b in range(2):
        for layer in (0, 2):
            ref = reference_row(model, cap, b, None, layer=layer)
            torch.testing.assert_close(ref.logits, full[b, ref.kept_cols], **IDENTITY_TOL)
            refg = reference_row(model, capg, b, None, layer=layer, max_new_tokens=NEW_TOKENS)
            assert refg.tokens.tolist() == new[b].tolist()
        keep = pattern_keeps(inputs, model)[b]
        ref = reference_row(model, cap, b, keep)
        torch.testing.assert_close(ref.logits, reference_via_language_model(model, cap, b, keep), **TOL)
        # pruning must matter, or the reference tests would prove nothing
        assert (ref.logits[-1] - full[b, ref.kept_cols[-1]]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------------
# 1. identity
# ------------------------------------------------------------------------------------------------------

@matrix
def test_identity_keep_all(family, attn, layout):
    model = model_for(family, attn)
    inputs = inputs_for(model, *layout)
    base = forward(model, inputs).logits
    base_new, base_steps = generate(model, inputs)
    mask = inputs["attention_mask"].bool()
    for stage in STAGES:
        with vlm_prune.pruned(model, keep_all_method(stage_layer(family, stage))):
            got = forward(model, inputs).logits
            new, steps = generate(model, inputs)
        assert got.shape == base.shape, stage
        torch.testing.assert_close(got[mask], base[mask], **IDENTITY_TOL)
        assert new.tolist() == base_new.tolist(), stage
        torch.testing.assert_close(steps, base_steps, **IDENTITY_TOL)


# ------------------------------------------------------------------------------------------------------
# 2. removal
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_removal_bit_identical(family, attn):
    model = model_for(family, attn)
    inputs = inputs_for(model, 2, "left")
    base = forward(model, inputs).logits
    base_new, _ = generate(model, inputs)
    before, before_global = hook_snapshot(model), global_hooks()

    handle = vlm_prune.apply(model, pattern_method(in_llm_layer(family)))
    forward(model, inputs)
    generate(model, inputs)
    handle.remove()
    assert hook_snapshot(model) == before
    assert global_hooks() == before_global
    assert torch.equal(forward(model, inputs).logits, base)
    assert torch.equal(generate(model, inputs)[0], base_new)

    # leaving the with-block on an exception raised by user code
    with pytest.raises(ValueError, match="user error"):
        with vlm_prune.pruned(model, Pattern()):
            forward(model, inputs)
            raise ValueError("user error")
    assert hook_snapshot(model) == before
    assert torch.equal(forward(model, inputs).logits, base)

    # an exception raised inside the pruned forward (by the method)
    with pytest.raises(Exception, match="boom"):
        with vlm_prune.pruned(model, Boom()):
            forward(model, inputs)
    assert hook_snapshot(model) == before
    assert global_hooks() == before_global
    assert torch.equal(forward(model, inputs).logits, base)
    assert torch.equal(generate(model, inputs)[0], base_new)

    # remove() twice is harmless, and the model can be pruned again
    handle.remove()
    with vlm_prune.pruned(model, Pattern()):
        forward(model, inputs)
    assert hook_snapshot(model) == before


# ------------------------------------------------------------------------------------------------------
# 3/4. reference equivalence, pre-LLM and layer k; 5. positions (both policies); 7. cache
# ------------------------------------------------------------------------------------------------------

def _check_reference(model, inputs, layer, policy="preserve", gen=True, trim_cache=True):
    keeps = pattern_keeps(inputs, model)
    rows = range(len(keeps))
    cap = capture(model, inputs, "forward")
    capg = capture(model, inputs, "generate") if gen else None
    refs = [
        reference_row(model, cap, b, keeps[b], layer=layer, policy=policy, trim_cache=trim_cache) for b in rows
    ]
    with vlm_prune.pruned(model, pattern_method(layer), position_policy=policy, trim_cache=trim_cache) as handle:
        out = forward(model, inputs)
        index = kept_index(handle)
        assert_matches_reference(out.logits, index, refs, inputs.get("attention_mask"))
        # 7. cache: every layer holds the kept length after prefill (trimmed), or the full length below k
        cache = cache_of(out)
        assert cache is not None, "forward(use_cache default) returned no cache"
        lengths = [int(lay.keys.shape[-2]) for lay in cache.layers]
        kept, full = index.shape[1], inputs["input_ids"].shape[1]
        if trim_cache or layer == 0:
            assert lengths == [kept] * len(lengths)
        else:
            assert lengths == [full] * layer + [kept] * (len(lengths) - layer)
        kv_bytes = getattr(handle.stats, "kv_cache_bytes", None)
        if kv_bytes is not None:
            actual = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
            assert kv_bytes == actual, "stats.kv_cache_bytes does not match the cache tensors"
        if gen:
            new, steps = generate(model, inputs)
    if gen:
        grefs = [
            reference_row(
                model, capg, b, keeps[b], layer=layer, policy=policy, trim_cache=trim_cache,
                max_new_tokens=NEW_TOKENS,
            )
            for b in rows
        ]
        assert_generation_matches(new, steps, grefs)


@matrix
@pytest.mark.parametrize("stage", STAGES)
def test_reference_equivalence(family, attn, layout, stage):
    """Invariants 3 (stage "pre") and 4 (stage "llm"), policy "preserve", prefill + greedy decode."""
    model = model_for(family, attn)
    inputs = inputs_for(model, *layout)
    _check_reference(model, inputs, stage_layer(family, stage), gen=layout[1] == "left")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_policy(family, layout, stage):
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, *layout)
    _check_reference(model, inputs, stage_layer(family, stage), "compact", gen=layout[1] == "left")


@pytest.mark.parametrize("family", FAMILIES)
def test_no_trim_keeps_full_early_caches(family):
    model = model_for(family, "sdpa")
    _check_reference(model, inputs_for(model, 2, "left"), in_llm_layer(family), trim_cache=False)


@pytest.mark.parametrize("media", list(VIDEO_MEDIA))
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_reference_video(family, stage, media):
    """Invariants 3 and 4 on prompts holding a video (Qwen3-VL: per-frame spans separated by timestamp tokens;
    OneVision: the video's newline stays text), alone or with an image on either side, prefill and decode."""
    model = model_for(family, "sdpa")
    _check_reference(model, inputs_for(model, 2, "left", **VIDEO_MEDIA[media]), stage_layer(family, stage))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_reference_video_right_padding_and_eager(family, stage):
    """Video + image prefill under right padding (sdpa) and, decode included, under eager attention."""
    model = model_for(family, "sdpa")
    _check_reference(model, inputs_for(model, 2, "right", video=True), stage_layer(family, stage), gen=False)
    eager = model_for(family, "eager")
    _check_reference(eager, inputs_for(eager, 2, "left", video=True, video_first=True), stage_layer(family, stage))


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_per_row(family):
    model = model_for(family, "sdpa")
    _check_reference(model, inputs_for(model, 2, "left", num_images=2), 0)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_with_text_only_row(family, stage):
    """Row 0 has no image, row 1 has one: the text-only row passes through, the other is pruned."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", num_images=[0, 1])
    _check_reference(model, inputs, stage_layer(family, stage))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_cache(family, stage):
    """generate(use_cache=False) re-runs the pruned prefill every step; without cache trimming that is
    the same computation as cached decoding, so the tokens must match."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    with vlm_prune.pruned(model, pattern_method(stage_layer(family, stage)), trim_cache=False):
        cached, _ = generate(model, inputs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == cached.tolist()


def test_qwen3_deepstack_layer_stage():
    """Qwen3-VL adds deepstack features after layers 0..2: an in-LLM stage there must either be exact
    (the kept tokens keep their own deepstack residuals, the pruned ones lose theirs) or be refused
    with a PruneError that says where stages may run."""
    if "qwen3_vl" not in FAMILIES:
        pytest.skip("no Qwen3-VL in this transformers")
    model = model_for("qwen3_vl", "sdpa")
    try:
        vlm_prune.apply(model, pattern_method(2)).remove()
    except vlm_prune.PruneError as err:
        assert "layer" in str(err)
        return
    _check_reference(model, inputs_for(model, 2, "left"), 2)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_mask_no_cache(family, stage):
    """forward(use_cache=False) without attention_mask at batch 1: the packed-sequence trap."""
    model = model_for(family, "sdpa")
    layer = stage_layer(family, stage)
    inputs = inputs_for(model, 1, "left")
    inputs.pop("attention_mask")
    cap = capture(model, inputs, "forward")
    n = visual_counts(inputs["input_ids"], model=model)[0]
    ref = reference_row(model, cap, 0, pattern_mask(n), layer=layer)
    with vlm_prune.pruned(model, pattern_method(layer)) as handle:
        out = forward(model, inputs, use_cache=False)
        assert_matches_reference(out.logits, kept_index(handle), [ref])


def assert_rows_equal_rows_alone(model, inputs: dict, method, padding: str) -> None:
    """Each row of the padded batch keeps the tokens, logits and (left padding) greedy tokens of the row alone."""
    with vlm_prune.pruned(model, method) as handle:
        logits = forward(model, inputs).logits
        index = kept_index(handle).clone()
        new = generate(model, inputs)[0] if padding == "left" else None
        for b in range(inputs["input_ids"].shape[0]):
            alone = single_row(inputs, b)
            alone_logits = forward(model, alone).logits[0]
            alone_index = kept_index(handle)[0]
            offset = int((~inputs["attention_mask"][b].bool()).sum()) if padding == "left" else 0
            valid = real_slots(index, inputs["attention_mask"])[b]
            assert torch.equal(index[b][valid] - offset, alone_index[alone_index >= 0])
            torch.testing.assert_close(logits[b][valid], alone_logits[alone_index >= 0], **TOL)
            if new is not None:
                assert generate(model, alone)[0][0].tolist() == new[b].tolist()


# ------------------------------------------------------------------------------------------------------
# 6. batch: each row == that row alone
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_row_equals_row_alone(family, padding, stage):
    model = model_for(family, "sdpa")
    method = pattern_method(stage_layer(family, stage))
    assert_rows_equal_rows_alone(model, inputs_for(model, 2, padding), method, padding)


# ------------------------------------------------------------------------------------------------------
# 8. determinism; instances; text-only passthrough
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_determinism(family):
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    with vlm_prune.pruned(model, SeededRandom()) as handle:
        a_logits = forward(model, inputs).logits
        a = kept_index(handle).clone()
        b_logits = forward(model, inputs).logits
        assert torch.equal(kept_index(handle), a)
        assert torch.equal(a_logits, b_logits)
        alone = single_row(inputs, 1)
        forward(model, alone)
        alone_index = kept_index(handle)[0]
    offset = int((~inputs["attention_mask"][1].bool()).sum())
    real = real_slots(a, inputs["attention_mask"])[1]
    assert torch.equal(a[1][real] - offset, alone_index[alone_index >= 0])
    with vlm_prune.pruned(model, SeededRandom()) as handle:
        forward(model, inputs)
        assert torch.equal(kept_index(handle), a)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_instances_do_not_interfere(family):
    m1 = model_for(family, "sdpa")
    m2 = build_tiny(family, seed=0)  # a second instance of the same class, same weights
    m3 = model_for(family, "eager")  # never wrapped here: must stay untouched
    k = in_llm_layer(family)
    inputs = inputs_for(m1, 2, "left")
    keeps = pattern_keeps(inputs, m1)
    cap = capture(m1, inputs, "forward")
    capg = capture(m1, inputs, "generate")
    base = forward(m3, inputs).logits
    base_new, _ = generate(m3, inputs)
    untouched = hook_snapshot(m3)
    h1 = vlm_prune.apply(m1, pattern_method(0))
    h2 = vlm_prune.apply(m2, pattern_method(k))
    try:
        o1 = forward(m1, inputs)
        i1 = kept_index(h1).clone()
        o2 = forward(m2, inputs)
        i2 = kept_index(h2).clone()
        g1 = generate(m1, inputs)
        o3 = forward(m3, inputs)
        g2 = generate(m2, inputs)
        g3 = generate(m3, inputs)
        assert hook_snapshot(m3) == untouched
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(o3.logits, base)
    assert torch.equal(g3[0], base_new)
    for layer, out, idx, (new, steps) in ((0, o1, i1, g1), (k, o2, i2, g2)):
        refs = [reference_row(m1, cap, b, keeps[b], layer=layer) for b in range(2)]
        assert_matches_reference(out.logits, idx, refs, inputs["attention_mask"])
        grefs = [
            reference_row(m1, capg, b, keeps[b], layer=layer, max_new_tokens=NEW_TOKENS) for b in range(2)
        ]
        assert_generation_matches(new, steps, grefs)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_passes_through(family, stage):
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", num_images=0)
    base = forward(model, inputs).logits
    base_new, base_steps = generate(model, inputs)
    with vlm_prune.pruned(model, pattern_method(stage_layer(family, stage))):
        got = forward(model, inputs).logits
        new, steps = generate(model, inputs)
    assert got.shape == base.shape
    torch.testing.assert_close(got, base, atol=1e-6, rtol=1e-6)
    assert new.tolist() == base_new.tolist()
    torch.testing.assert_close(steps, base_steps, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------
# generate() expansion: num_beams / num_return_sequences repeat each row and its encoded media
# ------------------------------------------------------------------------------------------------------

BEAMS = dict(max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
# methods whose selection reads vision-tower recordings (grids, projector inputs, vision attention), which
# stay in the encoder's order while generate() expands the rows; plus a pure method as a control
BEAM_METHODS = {"pattern": {}, "random": {"keep": 0.5}, "zoo": {"keep": 0.5}, "visionzip": {"keep": 4}}
_ANYRES = ("llava_next", "llava_onevision", "llava_next_video")  # no per-token projector / tower signals
BEAM_UNSUPPORTED = {(method, family) for method in ("zoo", "visionzip") for family in _ANYRES}
BEAM_UNSUPPORTED.add(("visionzip", "qwen3_vl"))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_identity(family, stage):
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    with torch.no_grad():
        expected = model.generate(**inputs, **BEAMS)
        with vlm_prune.pruned(model, keep_all_method(stage_layer(family, stage))):
            got = model.generate(**inputs, **BEAMS)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in FAMILIES for m in BEAM_METHODS if (m, f) not in BEAM_UNSUPPORTED],
)
def test_every_beam_prunes_like_its_row(family, method):
    """With 3 beams per row, each beam keeps exactly the tokens greedy decoding of its row keeps."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    spec = pattern_method(0) if method == "pattern" else method
    options = BEAM_METHODS[method]
    with torch.no_grad(), vlm_prune.pruned(model, spec, **options) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        greedy_kept = handle.last_kept_index.clone()
        beams = model.generate(**inputs, **BEAMS)
        beam_kept = handle.last_kept_index.clone()
    assert beams.shape[0] == 2 * BEAMS["num_return_sequences"]
    assert beam_kept.shape == (2 * BEAMS["num_beams"], greedy_kept.shape[1])
    assert (greedy_kept >= 0).sum() < inputs["attention_mask"].sum(), "something was pruned"
    for row in range(2):
        for beam in range(BEAMS["num_beams"]):
            assert torch.equal(beam_kept[row * BEAMS["num_beams"] + beam], greedy_kept[row])


# ------------------------------------------------------------------------------------------------------
# generate(prefill_chunk_size=N): the prompt arrives in chunks
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["two rows", "two images in a row"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_every_media_token_in_the_first_chunk(family, layout):
    """Chunks after the media continue the pruned cache exactly; a chunk boundary before the last media
    token is refused with an error that names prefill_chunk_size.

    generate() hands a chunk the features of all its media as ONE block, so item boundaries come from the
    recorded vision-tower grids (Qwen), the fixed image size (LLaVA) or the rows (LLaVA-NeXT, whose anyres
    images have no fixed size: two images in one row are refused)."""
    from reference import VISUAL_IDS

    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left") if layout == "two rows" else inputs_for(model, 1, "left", num_images=2)
    media_columns = torch.isin(inputs["input_ids"], torch.tensor(VISUAL_IDS)).nonzero()[:, 1]
    length = inputs["input_ids"].shape[1]
    after_media = int(media_columns.max()) + 2
    assert after_media < length, "the prompt must go on after the media for the test to chunk it"
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if family in ("llava_next", "llava_next_video") and layout == "two images in a row":
        with torch.no_grad(), vlm_prune.pruned(model, pattern_method(0)):
            with pytest.raises(vlm_prune.InputError, match="more than one image"):
                model.generate(**inputs, prefill_chunk_size=after_media, **kwargs)
        return
    with torch.no_grad(), vlm_prune.pruned(model, pattern_method(0)) as handle:
        whole = model.generate(**inputs, **kwargs)
        items_whole = handle.stats.stages[0].tokens_in  # per row, per media item
        chunked = model.generate(**inputs, prefill_chunk_size=after_media, **kwargs)
        assert handle.stats.stages[0].tokens_in == items_whole, "the same media items, not one merged block"
        with pytest.raises(vlm_prune.InputError, match="prefill_chunk_size"):
            model.generate(**inputs, prefill_chunk_size=int(media_columns.min()) + 1, **kwargs)
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), **TOL)


# ------------------------------------------------------------------------------------------------------
# a second turn on the same cache
# ------------------------------------------------------------------------------------------------------


def _without_media(inputs: dict) -> dict:
    """The inputs minus the media: what a later turn on a cache that holds the media passes."""
    media = (
        "pixel_values", "image_grid_thw", "image_sizes", "batch_num_images",
        "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
    )
    return {key: value for key, value in inputs.items() if key not in media}


def _second_turn(inputs: dict, first: torch.Tensor, extra: list[int]) -> dict:
    """The conversation so far plus `extra` text tokens, with the first turn's media kwargs."""
    batch, grown = first.shape[0], first.shape[1] + len(extra) - inputs["input_ids"].shape[1]
    out = dict(inputs)
    out["input_ids"] = torch.cat([first, torch.tensor([extra] * batch)], dim=1)
    ones = torch.ones(batch, grown, dtype=inputs["attention_mask"].dtype)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in inputs:
        zeros = torch.zeros(batch, grown, dtype=inputs["mm_token_type_ids"].dtype)
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], dim=1)
    return out


@pytest.mark.parametrize(("stage", "policy"), [("pre", "preserve"), ("llm", "preserve"), ("pre", "compact")])
@pytest.mark.parametrize("family", FAMILIES)
def test_second_turn_on_the_pruned_cache_equals_a_fresh_pruned_prefill(family, stage, policy):
    """generate() slices a follow-up prompt by the PHYSICAL cache length, which pruning shortened; the engine
    drops the re-sent tokens and keeps positions. Another conversation in between must not disturb it.

    In-LLM stages run with trim_cache=False: a fresh prefill lets later text see every visual token in the
    layers before the stage, which is what an untrimmed cache keeps (trimming drops them by design)."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    method = pattern_method(stage_layer(family, stage))
    options = dict(position_policy=policy, trim_cache=stage == "pre")
    with torch.no_grad(), vlm_prune.pruned(model, method, **options):
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        follow_up = _second_turn(inputs, first.sequences, [20, 21, 22, 23])
        fresh = model.generate(**follow_up, max_new_tokens=NEW_TOKENS, **kwargs)  # another cache meanwhile
        reused = model.generate(
            **_without_media(follow_up), cache=first.past_key_values, max_new_tokens=NEW_TOKENS, **kwargs
        )
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), **TOL)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_identity_and_pruned_rows(family, stage):
    """In bfloat16 the keep-all engine is bit-identical, and a pruned batch row equals the row alone up to a
    few bf16 rounding steps at the logits' scale (rows re-padded to another length round differently)."""
    model = build_tiny(family, attn_implementation="sdpa").to(torch.bfloat16)
    inputs = inputs_for(model, 2, "left")
    inputs = {k: v.to(torch.bfloat16) if torch.is_floating_point(v) else v for k, v in inputs.items()}
    layer = stage_layer(family, stage)
    with torch.no_grad():
        base = model(**inputs).logits
        base_new = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with vlm_prune.pruned(model, keep_all_method(layer)):
            assert torch.equal(model(**inputs).logits, base)
            assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), base_new)
        with vlm_prune.pruned(model, pattern_method(layer)):
            batched = model(**inputs).logits
            for row in range(2):
                alone = model(**single_row(inputs, row)).logits[0]
                scale = alone.abs().max().float().item()
                bf16_step = 2.0 ** (math.floor(math.log2(scale)) - 7)  # spacing of bf16 values near `scale`
                gap = (batched[row, -alone.shape[0] :] - alone).abs().max().item()
                assert gap <= 4 * bf16_step, (gap, bf16_step)


# ------------------------------------------------------------------------------------------------------
# labels: the model's own loss, over the kept positions
# ------------------------------------------------------------------------------------------------------


def test_kept_labels_follow_the_kept_columns():
    from vlm_prune.engine.labels import kept_labels

    labels = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    kept = torch.tensor([[0, 2, 3, 4], [-1, -1, 1, 4]])
    assert kept_labels(labels, kept).tolist() == [[10, 12, 13, 14], [-100, -100, 21, 24]]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_give_the_loss_over_the_kept_tokens(family, stage):
    """Keep-all: exactly the unwrapped loss (dict and tuple outputs). Pruned: the cross-entropy of the text
    after the media, computed by hand from the pruned logits, whose text tail keeps its place at the end."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left")
    layer = stage_layer(family, stage)
    from reference import VISUAL_IDS

    ids = inputs["input_ids"]
    last_media = int(torch.isin(ids, torch.tensor(VISUAL_IDS)).nonzero()[:, 1].max())
    labels = torch.full_like(ids, -100)
    labels[:, last_media + 1 :] = ids[:, last_media + 1 :]  # supervise the text after the media
    tail = ids.shape[1] - last_media - 1
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        with vlm_prune.pruned(model, keep_all_method(layer)):
            assert torch.equal(model(**inputs, labels=labels).loss, expected)
            assert torch.equal(model(**inputs, labels=labels, return_dict=False)[0], expected)
        with vlm_prune.pruned(model, pattern_method(layer)) as handle:
            got = model(**inputs, labels=labels)
            logits = model(**inputs).logits
    assert handle.stats.visual_tokens_out < handle.stats.visual_tokens_in
    # slot i predicts the token of slot i+1; the supervised tail is predicted from the `tail` slots before
    # its last token, the first of them being the last token kept before the tail
    predicted = logits[:, -tail - 1 : -1].float()
    targets = ids[:, -tail:]
    by_hand = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(got.loss, by_hand, atol=1e-5, rtol=1e-5)


def test_pruned_loss_backpropagates():
    model = build_tiny("llava")
    inputs = inputs_for(model, 2, "left")
    with vlm_prune.pruned(model, "random", keep=0.5):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_deep_copied_prompt_cache_serves_several_questions(family, stage):
    """transformers' prompt-reuse pattern: prefill the image prompt once, then answer each question on a
    `copy.deepcopy` of that cache. The pruned state travels with the copy; each answer equals a fresh pruned
    prefill of prompt + question. A reset cache starts over as an unpruned one."""
    import copy

    from transformers import DynamicCache

    model = model_for(family, "sdpa")
    prompt = inputs_for(model, 1, "left")
    method = pattern_method(stage_layer(family, stage))
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, max_new_tokens=NEW_TOKENS)
    with torch.no_grad(), vlm_prune.pruned(model, method, trim_cache=stage == "pre"):
        prompt_cache = DynamicCache(config=model.config.get_text_config())
        model(**prompt, cache=prompt_cache)
        for question in ([20, 21, 22], [30, 31]):
            full = _second_turn(prompt, prompt["input_ids"], question)
            fresh = model.generate(**full, **kwargs)
            reused = model.generate(**_without_media(full), cache=copy.deepcopy(prompt_cache), **kwargs)
            assert torch.equal(reused.sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), **TOL)
        prompt_cache.reset()
        text = inputs_for(model, 1, "left", num_images=0)
        expected = model.generate(**text, **kwargs).sequences
        assert torch.equal(model.generate(**text, cache=prompt_cache, **kwargs).sequences, expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prompt_lookup_decoding_equals_greedy(family):
    """Assisted decoding feeds candidate tokens with the prompt and crops the rejected ones off the cached
    prefill (the text tail after the image): it must produce the greedy tokens."""
    model = model_for(family, "sdpa")
    base = inputs_for(model, 1, "left")
    tail = base["input_ids"][0, -6:].tolist()
    inputs = _second_turn(base, base["input_ids"], tail[:2])  # ends with an n-gram seen earlier: candidates
    sent = []
    probe = model.register_forward_pre_hook(lambda m, a, k: sent.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad(), vlm_prune.pruned(model, pattern_method(0)):
            greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            sent.clear()
            assisted = model.generate(**inputs, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        probe.remove()
    assert sent[0] > inputs["input_ids"].shape[1], "candidates were fed with the prompt"
    assert torch.equal(assisted, greedy)


def test_a_later_handle_continues_a_cache_filled_under_an_earlier_one():
    """The pruned-cache mapping travels with the cache: decoding under a new handle equals decoding under the
    handle that filled it."""
    import copy

    model = model_for("llava", "sdpa")  # (a manual Qwen decode step with a mask fails in transformers itself)
    inputs = inputs_for(model, 2, "left")
    step = torch.tensor([[20], [21]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=inputs["attention_mask"].dtype)], dim=1)
    with torch.no_grad():
        with vlm_prune.pruned(model, pattern_method(0)):
            cache = model(**inputs).cache
            spare = copy.deepcopy(cache)
            expected = model(input_ids=step, attention_mask=mask, cache=cache).logits
        with vlm_prune.pruned(model, "random", keep=0.5):
            got = model(input_ids=step, attention_mask=mask, cache=spare).logits
    torch.testing.assert_close(got, expected, **TOL)

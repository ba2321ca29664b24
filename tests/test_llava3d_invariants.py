"""DESIGN.md invariants on a tiny LLaVA-3D (issue 12), reusing the invariant helpers of test_invariants.py.

The scene's voxel tokens are one SCENE media item per row; rows hold different voxel counts, so every padded
batch also has rows of different visual lengths. The hand-built reference (tests/reference.py) never uses the
engine: it sees what the unwrapped model's language model receives.
"""

from __future__ import annotations

import pytest
import test_invariants as inv
import torch
from test_invariants import (
    BEAM_METHODS,
    BEAMS,
    IDENTITY_TOL,
    NEW_TOKENS,
    TOL,
    Boom,
    Pattern,
    _check_reference,
    _second_turn,
    assert_rows_equal_rows_alone,
    forward,
    generate,
    global_hooks,
    hook_snapshot,
    keep_all_method,
    pattern_method,
)
from test_invariants_video import assert_beams_keep_their_rows_tokens

import vlm_prune
from vlm_prune.engine.context import IMAGE, SCENE
from vlm_prune.models.llava3d.tiny import build_tiny_llava3d, make_scene_inputs, single_scene_row

LAYER_K = 2
LAYOUTS = [(1, "left"), (2, "left"), (2, "right")]
_MODELS: dict = {}
torch.set_num_threads(1)


def model_for(attn: str = "sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = build_tiny_llava3d(4, attn_implementation=attn)
    return _MODELS[attn]


def scene_inputs(model, batch=2, padding="left", **kw):
    inputs = make_scene_inputs(model, batch=batch, padding=padding, **kw)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    if batch > 1:
        assert len(set(counts)) == batch, f"rows should differ in voxel count, got {counts}"
    return inputs


class Recorder(vlm_prune.Method):
    """Keeps everything and records each sample's layout."""

    layer = 0

    def __init__(self):
        self.layouts = []

    def select(self, ctx):
        self.layouts.append(ctx.layout)
        return torch.ones(ctx.num_visual, dtype=torch.bool)


def test_layout_is_one_scene_with_voxel_coordinates():
    model = model_for()
    inputs = scene_inputs(model)
    recorder = Recorder()
    with torch.no_grad(), vlm_prune.pruned(model, recorder):
        encoded = model.get_image_features(
            inputs["pixel_values"], inputs["depths"], inputs["intrinsics"], inputs["poses"], inputs["axis_align"]
        )
        forward(model, inputs)
    assert len(recorder.layouts) == 2
    for b, layout in enumerate(recorder.layouts):
        assert layout.num_media == 1 and bool((layout.kind == SCENE).all()) and bool((layout.media_index == 0).all())
        assert torch.equal(layout.voxel, encoded.voxel_ijk[b]) and torch.equal(layout.grid_thw, layout.voxel)
        torch.testing.assert_close(layout.xyz, encoded.voxel_xyz[b])
        assert layout.media_grid[0] == tuple((layout.voxel.max(0).values + 1).tolist())
        keys = layout.voxel[:, 0] * 10**6 + layout.voxel[:, 1] * 10**3 + layout.voxel[:, 2]
        assert bool((keys[1:] > keys[:-1]).all()), "voxels must be in lexicographic order"
    assert len(recorder.layouts[0]) != len(recorder.layouts[1])


def test_2d_mode_layout_is_an_image_grid():
    model = model_for()
    inputs = scene_inputs(model, batch=1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = torch.tensor([[1, 20, *([3] * side * side), 21, 22]])
    pixels = inputs["pixel_values"][:, 0]
    image_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    recorder = Recorder()
    with torch.no_grad():
        base = forward(model, image_inputs).logits
        with vlm_prune.pruned(model, recorder):
            got = forward(model, image_inputs).logits
    (layout,) = recorder.layouts
    assert bool((layout.kind == IMAGE).all()) and layout.media_grid == [(1, side, side)] and layout.xyz is None
    torch.testing.assert_close(got, base, **IDENTITY_TOL)
    with vlm_prune.pruned(model, "pool", keep=4):
        forward(model, image_inputs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["b1", "b2-left", "b2-right"])
def test_identity_keep_all(attn, layout):
    model = model_for(attn)
    inputs = scene_inputs(model, *layout, clicks=True)
    base = forward(model, inputs).logits
    base_new, base_steps = generate(model, inputs)
    mask = inputs["attention_mask"].bool()
    for layer in (0, LAYER_K):
        with vlm_prune.pruned(model, keep_all_method(layer)):
            got = forward(model, inputs).logits
            new, steps = generate(model, inputs)
        torch.testing.assert_close(got[mask], base[mask], **IDENTITY_TOL)
        assert new.tolist() == base_new.tolist()
        torch.testing.assert_close(steps, base_steps, **IDENTITY_TOL)


def test_removal_bit_identical():
    model = model_for()
    inputs = scene_inputs(model)
    base = forward(model, inputs).logits
    base_new, _ = generate(model, inputs)
    before, before_global = hook_snapshot(model), global_hooks()
    handle = vlm_prune.apply(model, pattern_method(LAYER_K))
    forward(model, inputs)
    generate(model, inputs)
    handle.remove()
    assert hook_snapshot(model) == before and global_hooks() == before_global
    assert torch.equal(forward(model, inputs).logits, base)
    assert torch.equal(generate(model, inputs)[0], base_new)
    with pytest.raises(Exception, match="boom"), vlm_prune.pruned(model, Boom()):
        forward(model, inputs)
    assert hook_snapshot(model) == before
    assert torch.equal(forward(model, inputs).logits, base)
    with vlm_prune.pruned(model, Pattern()):
        forward(model, inputs)
    assert hook_snapshot(model) == before


@pytest.mark.parametrize("layer", [0, LAYER_K])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["b1", "b2-left", "b2-right"])
def test_reference_equivalence(layout, layer):
    model = model_for()
    inputs = scene_inputs(model, *layout, clicks=True)
    _check_reference(model, inputs, layer, gen=layout[1] == "left")


@pytest.mark.parametrize("layer", [0, LAYER_K])
def test_reference_compact_policy_and_untrimmed_cache(layer):
    model = model_for("eager")
    inputs = scene_inputs(model)
    _check_reference(model, inputs, layer, policy="compact")
    if layer:
        _check_reference(model, inputs, layer, trim_cache=False, gen=False)


@pytest.mark.parametrize("layer", [0, LAYER_K])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_row_equals_row_alone(padding, layer, monkeypatch):
    model = model_for()
    monkeypatch.setattr(inv, "single_row", single_scene_row)  # the helper's row slicer, for scene inputs
    assert_rows_equal_rows_alone(model, scene_inputs(model, 2, padding), pattern_method(layer), padding)


def test_beams():
    model = model_for()
    inputs = scene_inputs(model)
    with torch.no_grad():
        expected = model.generate(**inputs, **BEAMS)
        with vlm_prune.pruned(model, keep_all_method(0)):
            assert torch.equal(model.generate(**inputs, **BEAMS), expected)
    assert_beams_keep_their_rows_tokens(model, inputs, pattern_method(0))
    for method in ("zoo", "visionzip"):  # vision-side recordings follow generate()'s row expansion
        assert_beams_keep_their_rows_tokens(model, inputs, method, **BEAM_METHODS[method])


@pytest.mark.parametrize(("layer", "policy"), [(0, "preserve"), (LAYER_K, "preserve"), (0, "compact")])
def test_second_turn_on_the_pruned_cache(layer, policy):
    model = model_for()
    inputs = scene_inputs(model)
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    media = ("pixel_values", "depths", "intrinsics", "poses", "axis_align")
    with torch.no_grad(), vlm_prune.pruned(model, pattern_method(layer), position_policy=policy, trim_cache=layer == 0):
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        follow_up = _second_turn(inputs, first.sequences, [20, 21, 22, 23])
        fresh = model.generate(**follow_up, max_new_tokens=NEW_TOKENS, **kwargs)
        text_only = {k: v for k, v in follow_up.items() if k not in media}
        reused = model.generate(**text_only, cache=first.past_key_values, max_new_tokens=NEW_TOKENS, **kwargs)
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), **TOL)


EXISTING = ("random", "pool", "divprune", "fastv", "zoo", "visionzip", "adaptinfer", "lvlm-csp")
#: methods for other media, which refuse a scene with the error they give a single image
REFUSING = {"evs": "prunes video", "prunevid": "prunes video", "catp": "few-shot"}


def built(name: str, keep: float = 0.5) -> list:
    """The named method with its budget set, as instances (what `assert_rows_equal_rows_alone` takes)."""
    from vlm_prune.methods.registry import get_methods

    methods = get_methods(name)
    for method in methods:
        method.keep = keep
    return methods


@pytest.mark.parametrize("name", EXISTING)
def test_existing_methods_run_and_prune_each_row_like_alone(name, monkeypatch):
    """Every image method runs on scenes and prunes; a padded row keeps what the row alone keeps."""
    if name not in vlm_prune.methods():
        pytest.skip(f"{name} is not registered")
    model = model_for()
    inputs = scene_inputs(model, 2, "left")
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    with torch.no_grad(), vlm_prune.pruned(model, built(name)) as handle:
        forward(model, inputs)
        pruned = (inputs["attention_mask"] > 0).sum(1) - (handle.last_kept_index >= 0).sum(1)
    assert bool((pruned > 0).all()) and bool((pruned < counts).all()), (name, pruned.tolist(), counts.tolist())
    monkeypatch.setattr(inv, "single_row", single_scene_row)
    assert_rows_equal_rows_alone(model, inputs, built(name), "left")


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_methods_for_other_media_refuse_a_scene_clearly(name):
    model = model_for()
    inputs = scene_inputs(model, 1)
    with pytest.raises(vlm_prune.PruneError, match=REFUSING[name]), vlm_prune.pruned(model, name, keep=0.5):
        forward(model, inputs)


class SignalRecorder(vlm_prune.Method):
    layer = 0
    needs = frozenset({"vision_attention", "projector"})

    def __init__(self):
        self.seen = []

    def select(self, ctx):
        self.seen.append((ctx.vision_attention.clone(), ctx.projector_inputs.clone(), ctx.visual_features.clone()))
        return torch.ones(ctx.num_visual, dtype=torch.bool)


def test_vision_signals_are_per_voxel_means_of_the_patches():
    """A voxel's CLS attention is the mean over its patches (hand-grouped here); its projector input maps onto
    its embedding through the projector."""
    from vlm_prune.adapters.vision_signals import clip_layer_cls_attention

    model = model_for()
    inputs = scene_inputs(model)
    recorder = SignalRecorder()
    with torch.no_grad(), vlm_prune.pruned(model, recorder):
        forward(model, inputs)
        tower = model.model.vision_tower
        pixel = inputs["pixel_values"].flatten(0, 1)
        hidden = tower(pixel, output_hidden_states=True).hidden_states
        layer = model.config.vision_feature_layer
        received, _ = clip_layer_cls_attention(tower.encoder.layers[layer], hidden[layer - 1])
        encoded = model.get_image_features(
            inputs["pixel_values"], inputs["depths"], inputs["intrinsics"], inputs["poses"], inputs["axis_align"]
        )
    from vlm_prune.models.llava3d.modeling import scene_geometries

    geometries = scene_geometries(
        inputs["depths"], inputs["intrinsics"], inputs["poses"], inputs["axis_align"], (4, 4),
        model.config.voxel_size, model.config.max_voxels, model.config.voxel_seed,
    )
    per_scene = received.reshape(2, -1)
    for b, (attention, projector_in, embeds) in enumerate(recorder.seen):
        geometry = geometries[b]
        expected = torch.stack([
            per_scene[b, geometry.patch_index[geometry.patch_voxel == v]].mean() for v in range(len(geometry))
        ])
        torch.testing.assert_close(attention, expected)
        with torch.no_grad():
            torch.testing.assert_close(model.model.multi_modal_projector(projector_in), embeds, **TOL)
        torch.testing.assert_close(embeds, encoded.pooler_output[b], **TOL)


def test_chunked_prefill_after_the_scene_and_a_split_scene_refused():
    model = model_for()
    inputs = scene_inputs(model)
    media = (inputs["input_ids"] == model.config.image_token_id).nonzero()[:, 1]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vlm_prune.pruned(model, pattern_method(0)) as handle:
        whole = model.generate(**inputs, **kwargs)
        items = handle.stats.stages[0].tokens_in
        chunked = model.generate(**inputs, prefill_chunk_size=int(media.max()) + 2, **kwargs)
        assert handle.stats.stages[0].tokens_in == items
        with pytest.raises(vlm_prune.InputError, match="prefill_chunk_size"):
            model.generate(**inputs, prefill_chunk_size=int(media.min()) + 1, **kwargs)
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), **TOL)


def test_an_image_after_a_scene_under_one_handle_is_an_image():
    """generate() encodes before the prefill; the adapter must not read the previous scene's recording."""
    model = model_for()
    scene = scene_inputs(model, batch=1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = torch.tensor([[1, 20, *([3] * side * side), 21, 22]])
    image = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": scene["pixel_values"][:, 0]}
    recorder = Recorder()
    with torch.no_grad(), vlm_prune.pruned(model, recorder):
        model.generate(**scene, max_new_tokens=2, do_sample=False)
        model.generate(**image, max_new_tokens=2, do_sample=False)
        model.generate(**scene, max_new_tokens=2, do_sample=False)
    kinds = [int(layout.kind[0]) for layout in recorder.layouts]
    assert kinds == [SCENE, IMAGE, SCENE], kinds

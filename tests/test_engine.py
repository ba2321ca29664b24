"""Engine units and bad input: budgets, gather, layouts, recorded signals, stats, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, StaticCache

import vlm_prune
from vlm_prune.engine.budget import split_keep, tokens_to_keep, validate_keep
from vlm_prune.kernels import gather_tokens
from vlm_prune.toy_models import build_tiny, make_inputs


@pytest.fixture(scope="module")
def models():
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in cache:
            cache[(family, attn)] = build_tiny(family, attn_implementation=attn)
        return cache[(family, attn)]

    return get


class Recorder(vlm_prune.Method):
    """Keeps everything and records every context it is given."""

    layer = 0

    def __init__(self, layer: int = 0, needs: frozenset[str] = frozenset()):
        self.layer = layer
        self.needs = needs
        self.contexts: list[vlm_prune.SelectionContext] = []

    def select(self, ctx):
        self.contexts.append(ctx)
        return torch.ones(ctx.num_visual, dtype=torch.bool)


# ---------------------------------------------------------------- budgets and gather
@pytest.mark.parametrize("bad", [0, -3, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", None, True, [0.5]])
def test_bad_keep_is_a_clear_budget_error(models, bad):
    model = models("llava")
    if bad is None:  # None is "the method's default": fine for fastv, an error for a budget-less scorer
        with pytest.raises(vlm_prune.BudgetError, match="needs a budget"):
            vlm_prune.apply(model, "random", keep=None)
        return
    with pytest.raises(vlm_prune.BudgetError, match="keep"):
        vlm_prune.apply(model, "random", keep=bad)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_keep_rounding_and_split():
    assert validate_keep(64) == 64 and validate_keep(0.25) == 0.25 and validate_keep(1) == 1
    assert tokens_to_keep(0.25, 576, 576) == 144
    assert tokens_to_keep(0.11, 576, 576) == 63  # round half up of 63.36
    assert tokens_to_keep(0.001, 576, 576) == 1  # never zero for a present item
    assert tokens_to_keep(64, 576, 100) == 64 and tokens_to_keep(640, 576, 100) == 100
    assert tokens_to_keep(0.5, 0, 0) == 0
    parts = split_keep(0.25, 2)
    assert parts[0] == pytest.approx(0.5) and parts[1] == pytest.approx(0.25)
    with pytest.raises(vlm_prune.BudgetError, match="composition"):
        split_keep(64, 2)


def test_gather_tokens_matches_manual_indexing():
    x = torch.randn(2, 5, 3)
    index = torch.tensor([[-1, 0, 3], [1, 2, 4]])
    out = gather_tokens(x, index)
    assert torch.equal(out[0, 0], torch.zeros(3))
    assert torch.equal(out[0, 1:], x[0, [0, 3]])
    assert torch.equal(out[1], x[1, [1, 2, 4]])
    cache_like = torch.randn(2, 4, 5, 6)  # (B, H, L, d)
    out = gather_tokens(cache_like, index, dim=2)
    assert torch.equal(out[1], cache_like[1][:, [1, 2, 4]])
    assert torch.equal(out[0, :, 0], torch.zeros(4, 6))


# ---------------------------------------------------------------- bad input
def test_unknown_method_lists_known_ones(models):
    with pytest.raises(vlm_prune.UnknownMethodError) as info:
        vlm_prune.apply(models("llava"), "fastvv", keep=0.5)
    for name in ("fastv", "random", "pool", "divprune"):
        assert name in str(info.value)


def test_unsupported_model_names_the_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32,
        )
    )
    with pytest.raises(vlm_prune.UnsupportedModelError) as info:
        vlm_prune.apply(model, "random", keep=0.5)
    assert "Qwen2-VL" in str(info.value) and "LLaVA" in str(info.value)


def test_layer_out_of_range_and_double_apply(models):
    model = models("llava")
    with pytest.raises(vlm_prune.PruneError, match="decoder layers"):
        vlm_prune.apply(model, "fastv", keep=0.5, layer=99)
    with vlm_prune.pruned(model, "random", keep=0.5):
        with pytest.raises(vlm_prune.PruneError, match="already pruned"):
            vlm_prune.apply(model, "random", keep=0.5)
    vlm_prune.apply(model, "random", keep=0.5).remove()  # allowed again after removal


def test_flex_attention_is_refused(models):
    model = build_tiny("llava")
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(vlm_prune.AttentionImplementationError, match="attn_implementation"):
        vlm_prune.apply(model, "random", keep=0.5)


def test_static_cache_is_refused(models):
    model = models("llava")
    inputs = make_inputs(model)
    with vlm_prune.pruned(model, "random", keep=0.5):
        with pytest.raises(vlm_prune.AttentionImplementationError, match="DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert not model._forward_pre_hooks



def test_quantized_cache_is_refused(models):
    model = models("llava")
    inputs = make_inputs(model)
    quantized = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
    with vlm_prune.pruned(model, "random", keep=0.5), pytest.raises(vlm_prune.PruneError, match="quantized"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, **quantized)



class _FirstHalf(vlm_prune.Method):
    """Keeps the first half of the visual tokens: the image's last tokens are pruned."""

    layer = 0

    def select(self, ctx):
        keep = torch.zeros(ctx.num_visual, dtype=torch.bool)
        keep[: ctx.num_visual // 2] = True
        return keep


def test_cropping_a_pruned_cache_follows_the_text_tail_and_refuses_the_pruned_part(models):
    model = models("llava")
    inputs = make_inputs(model)
    ids = inputs["input_ids"]
    text_after = ids.shape[1] - 1 - int((ids[0] == model.config.image_token_id).nonzero().max())
    assert text_after >= 3
    with torch.no_grad():
        with vlm_prune.pruned(model, _FirstHalf()) as handle:
            whole = model(**inputs)
            cache = whole.cache
            assert handle.stats.visual_tokens_out < handle.stats.visual_tokens_in
            # the last 3 positions are text after the image: crop them and send them again
            cache.crop(-3)
            again = model(input_ids=ids[:, -3:], attention_mask=inputs["attention_mask"], cache=cache)
            torch.testing.assert_close(again.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)
            # one slot more than the text after the image reaches the pruned tail of the image
            cache.crop(-(text_after + 1))
            with pytest.raises(vlm_prune.InputError, match="cropped into its pruned part"):
                model(input_ids=ids[:, -1:], cache=cache)


def test_media_with_a_filled_cache_is_refused(models):
    model = models("llava")
    inputs = make_inputs(model)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=inputs["input_ids"][:, :3], cache=cache)
    with vlm_prune.pruned(model, "random", keep=0.5), pytest.raises(vlm_prune.InputError, match="new cache"):
        with torch.no_grad():
            model(**inputs, cache=cache)
    assert isinstance(StaticCache, type)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_text_only_input_passes_through_with_zero_stats(models, family):
    model = models(family)
    inputs = make_inputs(model, num_images=0)
    with torch.no_grad():
        expected = model(**inputs).logits
        with vlm_prune.pruned(model, "random", keep=0.25) as handle:
            got = model(**inputs).logits
    assert torch.equal(got, expected)
    assert handle.stats.visual_tokens_in == 0 and handle.stats.visual_tokens_out == 0



@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_inputs_embeds_with_media_is_refused_and_without_media_passes(models, family):
    """Visual tokens are found by their ids: embeddings with media would silently go unpruned."""
    model = models(family)
    with_media, text_only = make_inputs(model), make_inputs(model, num_images=0)
    for inputs in (with_media, text_only):
        inputs["inputs_embeds"] = model.get_input_embeddings()(inputs.pop("input_ids"))
    with torch.no_grad():
        expected = model(**text_only).logits
        with vlm_prune.pruned(model, "random", keep=0.25):
            with pytest.raises(vlm_prune.InputError, match="pass the processor's input_ids"):
                model(**with_media)
            assert torch.equal(model(**text_only).logits, expected)


def test_video_method_on_images_is_a_media_kind_error(models):
    model = models("qwen2_vl")

    class VideoOnly(Recorder):
        media = "video"

    with vlm_prune.pruned(model, VideoOnly()), pytest.raises(vlm_prune.MediaKindError, match="video"):
        with torch.no_grad():
            model(**make_inputs(model))


def test_bad_mask_from_a_user_method_is_explained(models):
    model = models("llava")

    class Wrong(vlm_prune.Method):
        layer = 0

        def select(self, ctx):
            return torch.ones(ctx.num_visual + 1, dtype=torch.bool)

    with vlm_prune.pruned(model, Wrong()), pytest.raises(vlm_prune.PruneError, match="ctx.num_visual"):
        with torch.no_grad():
            model(**make_inputs(model))


# ---------------------------------------------------------------- layouts and signals
def test_llava_next_layout_matches_anyres_packing(models):
    model = models("llava_next")
    inputs = make_inputs(model, batch=2)
    recorder = Recorder()
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    from vlm_prune.adapters.llava import LlavaNextAdapter

    counts = LlavaNextAdapter(model)._counts_from_sizes({"image_sizes": inputs["image_sizes"]})
    for ctx, count in zip(recorder.contexts, counts):
        layout = ctx.layout
        assert ctx.num_visual == count
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        base = layout.grid_thw[: side * side]
        assert torch.equal(base[:, 1] * side + base[:, 2], torch.arange(side * side))
        newline = layout.grid_thw[:, 0] == -1
        hires = layout.grid_thw[layout.grid_thw[:, 0] == 1]
        rows = int(hires[:, 1].max()) + 1
        assert int(newline.sum()) == rows  # one newline closes every high-resolution row
        # each row's columns run 0..W-1 and every row has the same width
        widths = torch.bincount(hires[:, 1])
        assert bool((widths == widths[0]).all())


def test_qwen_video_layout_frames(models):
    model = models("qwen2_vl")
    inputs = make_inputs(model, video=True, num_images=0)
    recorder = Recorder()
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    ctx = recorder.contexts[0]
    t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
    merge = model.config.vision_config.spatial_merge_size
    assert ctx.num_visual == t * (h // merge) * (w // merge)
    assert bool((ctx.layout.kind == 1).all())
    assert torch.equal(ctx.layout.frame, torch.arange(t).repeat_interleave((h // merge) * (w // merge)))
    assert ctx.layout.media_grid == [(t, h // merge, w // merge)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_projector_signal_reproduces_the_visual_embeddings(models, family):
    """ctx.projector(ctx.projector_inputs) must equal the tokens' own embeddings, row for row."""
    model = models(family)
    inputs = make_inputs(model, batch=2)
    recorder = Recorder(needs=frozenset({"projector"}))
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
        for ctx in recorder.contexts:
            projected = ctx.projector(ctx.projector_inputs)
            torch.testing.assert_close(projected, ctx.visual_features, rtol=1e-4, atol=1e-5)
            weight, bias = ctx.projector_first
            torch.testing.assert_close(ctx.projector_tail(ctx.projector_inputs @ weight.T + bias), projected)


def test_projector_signal_inside_generate(models):
    model = models("qwen2_vl")
    inputs = make_inputs(model, batch=2)
    recorder = Recorder(needs=frozenset({"projector"}))
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(recorder.contexts) == 2
    for ctx in recorder.contexts:
        torch.testing.assert_close(ctx.projector(ctx.projector_inputs), ctx.visual_features, rtol=1e-4, atol=1e-5)


def test_clip_cls_attention_signal_equals_eager_attention():
    model = build_tiny("llava", attn_implementation="eager")
    inputs = make_inputs(model, batch=2)
    recorder = Recorder(needs=frozenset({"vision_attention"}))
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        tower = model.model.vision_tower
        out = tower(inputs["pixel_values"], output_attentions=True)
    # vision_feature_layer -2 -> the features are the output of layer L-2, whose attention VisionZip reads
    attn = out.attentions[len(out.attentions) - 2]  # (images, H, 1+N, 1+N)
    expected = attn[:, :, 0, 1:].sum(dim=1)
    for image, ctx in enumerate(recorder.contexts):
        torch.testing.assert_close(ctx.vision_attention, expected[image], rtol=1e-4, atol=1e-6)
        assert ctx.vision_keys.shape[0] == ctx.num_visual


# ---------------------------------------------------------------- stats
def test_stats_flops_formula_and_kv_bytes(models):
    model = models("llava")
    inputs = make_inputs(model)
    length = inputs["input_ids"].shape[1]
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    stats = handle.stats
    config = model.config.text_config
    d, m = config.hidden_size, config.intermediate_size
    head_dim = d // config.num_attention_heads
    dq, dkv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def layer_flops(n):
        return 2 * (n * d * (2 * dq + 2 * dkv) + 2 * n * n * dq + 3 * n * d * m)

    kept = length - (stats.visual_tokens_in - stats.visual_tokens_out)
    assert stats.prefill_flops_unpruned == config.num_hidden_layers * layer_flops(length)
    assert stats.prefill_flops == config.num_hidden_layers * layer_flops(kept)
    cache = out.past_key_values
    tensor_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert stats.kv_cache_bytes == tensor_bytes
    assert stats.kv_cache_bytes_unpruned == tensor_bytes * length // kept
    assert math.isclose(stats.keep_ratio, 0.5)
    assert stats.select_seconds >= 0 and "visual tokens" in str(stats)


def test_in_llm_stats_count_layers_before_the_stage(models):
    model = models("llava")
    inputs = make_inputs(model)
    length = inputs["input_ids"].shape[1]
    with vlm_prune.pruned(model, "fastv", keep=0.5, layer=2) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    removed = stats.visual_tokens_in - stats.visual_tokens_out
    layers = model.config.text_config.num_hidden_layers
    shape = handle.shape
    expected = 2 * shape.layer_flops(length) + (layers - 2) * shape.layer_flops(length - removed)
    assert stats.prefill_flops == expected
    visual = stats.visual_tokens_in
    assert stats.equivalent_average_tokens == pytest.approx((2 * visual + (layers - 2) * (visual - removed)) / layers)


# ---------------------------------------------------------------- decode paths
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_manual_decode_without_positions_matches_generate(models, family, policy):
    """A user decode loop that passes neither mask nor positions must continue exactly like generate()."""
    model = models(family)
    inputs = make_inputs(model)
    steps = 4
    with vlm_prune.pruned(model, "random", keep=0.5, position_policy=policy), torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[0, -steps:]
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            tokens.append(int(step.logits[0, -1].argmax()))
    assert tokens == generated.tolist()


def test_cache_is_trimmed_to_the_kept_length(models):
    model = models("qwen2_vl")
    inputs = make_inputs(model, batch=2)
    with vlm_prune.pruned(model, "fastv", keep=0.5) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    kept = handle.last_kept_index.shape[1]
    assert all(layer.keys.shape[-2] == kept for layer in out.past_key_values.layers)
    with vlm_prune.pruned(model, "fastv", keep=0.5, trim_cache=False) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths[-1] == handle.last_kept_index.shape[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_attention_rows_from_cached_keys_equal_recomputed_and_eager(models, family):
    """Rows from the keys layer k-1 cached, from recomputed keys, and from eager attention all agree."""
    model = build_tiny(family, attn_implementation="eager")
    inputs = make_inputs(model)
    with_cache, without_cache = (
        Recorder(layer=2, needs=frozenset({"attention"})),
        Recorder(layer=2, needs=frozenset({"attention"})),
    )
    with torch.no_grad():
        with vlm_prune.pruned(model, with_cache):
            model(**inputs, use_cache=True)
        with vlm_prune.pruned(model, without_cache):
            model(**inputs, use_cache=False)
        eager = model(**inputs, output_attentions=True).attentions[1][0]  # layer k-1 = 1, (H, L, L)
    ctx_cached, ctx_recomputed = with_cache.contexts[0], without_cache.contexts[0]
    queries = ctx_cached.text_index
    rows_cached = ctx_cached.attention_rows(queries)
    torch.testing.assert_close(rows_cached, ctx_recomputed.attention_rows(queries), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows_cached, eager[:, queries].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_second_turn_after_pruning_past_the_text_tail(family):
    """Pruning more tokens than the prompt has after its image: generate() takes the first turn's placeholders in
    `mm_token_type_ids[:, physical length:]` for new media and zeroes rope_deltas; the engine rebuilds the M-RoPE
    rows from the prefill's deltas, so the second turn equals a fresh pruned prefill of the whole conversation."""
    from vlm_prune.toy_models import build_tiny, make_inputs

    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, padding="left", image_grid=(8, 8), prompt_lengths=[3, 4])
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vlm_prune.pruned(model, "random", keep=0.1) as handle:
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        text_tail = int(inputs["input_ids"].shape[1] - (inputs["input_ids"] == 3).nonzero()[:, 1].max() - 1)
        assert handle.stats.visual_tokens_in - handle.stats.visual_tokens_out > 2 * text_tail  # past the tail
        batch, extra = first.sequences.shape[0], torch.tensor([[20, 21, 22]] * 2)
        grown = first.sequences.shape[1] + 3 - inputs["input_ids"].shape[1]
        follow_up = dict(inputs)
        follow_up["input_ids"] = torch.cat([first.sequences, extra], dim=1)
        follow_up["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(batch, grown).long()], dim=1)
        zeros = torch.zeros(batch, grown, dtype=inputs["mm_token_type_ids"].dtype)
        follow_up["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], dim=1)
        fresh = model.generate(**follow_up, max_new_tokens=4, **kwargs)
        text_only = {k: v for k, v in follow_up.items() if k not in ("pixel_values", "image_grid_thw")}
        reused = model.generate(**text_only, cache=first.past_key_values, max_new_tokens=4, **kwargs)
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), atol=2e-5, rtol=1e-4)


def test_qwen_decode_positions_are_rebuilt_only_once_the_model_replaced_its_deltas():
    """While the model still holds the prefill's `rope_deltas` tensor, generate() built the decode rows from it:
    `follow_up_position_ids` leaves them (None, no device op); once generate() replaced them (a later turn),
    rows equal to the text row get the prefill's deltas back, and real M-RoPE rows stay."""
    from vlm_prune.adapters.qwen_vl import QwenVLAdapter
    from vlm_prune.toy_models import build_tiny

    model = build_tiny("qwen2_vl")
    adapter = QwenVLAdapter(model)
    model.model.rope_deltas = torch.tensor([[-8], [-4]])
    state = adapter.position_state()
    text = torch.tensor([[30], [31]])
    plain = text.unsqueeze(0).expand(4, -1, -1)  # every M-RoPE row equals the text row (zeroed deltas)
    assert adapter.follow_up_position_ids(plain, state) is None  # the model's own deltas: left as they are
    model.model.rope_deltas = torch.zeros(2, 1, dtype=torch.long)  # generate() zeroed them for a later turn
    rebuilt = adapter.follow_up_position_ids(plain, state)
    assert rebuilt.tolist() == [[[30], [31]]] + [[[22], [27]]] * 3  # text row, then text + the prefill's deltas
    real = plain.clone()
    real[1:] += 5  # rows the model built itself (not the text row): kept
    assert torch.equal(adapter.follow_up_position_ids(real, state), real)

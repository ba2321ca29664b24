"""CATP (arXiv 2508.07871): every stage against a hand-computed example, lazy == plain greedy, and the engine path.

The hand examples use tiny 2-D / 3-D features whose (cos + 1) / 2 similarities, attention gains and cosines are
simple numbers; the expected picks are worked out in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
from vlm_prune.engine.context import IMAGE, SelectionContext, VisualLayout
from vlm_prune.engine.segments import build_segments
from vlm_prune.errors import InputError, MethodOptionError, PruneError
from vlm_prune.methods.catp import CATP, diverse_aligned, lazy_greedy, plain_greedy, unit_similarity
from vlm_prune.toy_models import build_tiny, make_inputs, single_row


# ------------------------------------------------------------------------------------------------ stage 1
def test_stage_one_hand_example_facility_location_plus_alignment():
    # x0 = x1 = (1, 0), x2 = (0, 1), x3 = (-1, 0); text mean v = (0, 1); sim = (cos + 1) / 2
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([0.0, 1.0])
    # step 1 gains (nothing covered): sum_x sim(y, x) + 0.7 sim(y, v)
    #   y0 = y1: 1 + 1 + .5 + 0 + .7 * .5 = 2.85;  y2: .5 + .5 + 1 + .5 + .7 * 1 = 3.2;  y3: 0 + 0 + .5 + 1 + .35 = 1.85
    assert diverse_aligned(features, text, 1, 0.7).tolist() == [False, False, True, False]
    # step 2 (covered .5 .5 1 .5): y0 = y1: .5 + .5 + .35 = 1.35 (tie: y0);  y3: .5 + .35 = .85
    assert diverse_aligned(features, text, 2, 0.7).tolist() == [True, False, True, False]
    # step 3 (covered 1 1 1 .5): y1: 0 + .35;  y3: .5 + .35 = .85 -> y3
    assert diverse_aligned(features, text, 3, 0.7).tolist() == [True, False, True, True]
    # without the alignment term step 1 is a tie y0 = y2 = 2.5: the earlier token
    assert diverse_aligned(features, None, 1, 0.7).tolist() == [True, False, False, False]


@pytest.mark.parametrize("seed", range(6))
def test_lazy_greedy_picks_exactly_what_plain_greedy_picks(seed):
    g = torch.Generator().manual_seed(seed)
    n = [40, 97, 150][seed % 3]
    features = torch.randn(n, 8, generator=g)
    if seed % 2:  # duplicated tokens: exact ties in the gains
        features[n // 2 :] = features[: n - n // 2].clone()
    similarity = unit_similarity(features, features)
    bonus = 0.7 * unit_similarity(features, torch.randn(1, 8, generator=g))[:, 0]
    for k in (1, n // 3, n - 1, n):
        assert lazy_greedy(similarity, bonus, k) == plain_greedy(similarity, bonus, k)
        assert lazy_greedy(similarity, bonus, k, refresh=1) == plain_greedy(similarity, bonus, k)


def test_greedy_order_is_the_objectives_best_first_step():
    # brute force: the first greedy pick maximises F over all singletons
    g = torch.Generator().manual_seed(3)
    features = torch.randn(12, 4, generator=g)
    similarity = unit_similarity(features, features)
    bonus = torch.rand(12, generator=g, dtype=torch.float64)
    values = [float(similarity[y].sum() + bonus[y]) for y in range(12)]
    assert plain_greedy(similarity, bonus, 1) == [max(range(12), key=lambda y: (values[y], -y))]


# ------------------------------------------------------------------------------------------------ stage 2 / 2'
def _context(hidden: torch.Tensor, visual: list[int], media: list[int], counts: tuple[int, ...], layer: int, rows=None):
    """A hand-built context: the sequence is `hidden` (L, D), visual tokens at `visual` of items `media`."""
    length = hidden.shape[0]
    visual_index = torch.tensor(visual)
    media_index = torch.tensor(media)
    ids = torch.full((length,), 20)
    ids[visual_index] = 3
    # the original prompt: each item held `counts[i]` tokens starting where its first surviving token is
    segments = build_segments(ids, torch.arange(length), visual_index, media_index, marker_ids={3})
    segments = type(segments)(segments.text_owner, segments.is_text, segments.item_start, counts, segments.query_media)
    layout = VisualLayout(
        media_index=media_index,
        kind=torch.full_like(media_index, IMAGE),
        frame=torch.zeros_like(media_index),
        grid_thw=torch.zeros(len(visual), 3, dtype=torch.long),
        media_grid=[(1, 1, 1)] * len(counts),
    )
    ctx = SelectionContext(
        layer=layer,
        num_visual=len(visual),
        budget=None,
        budget_per_media=None,
        visual_features=hidden[visual_index],
        hidden_states=hidden,
        visual_index=visual_index,
        input_ids=ids,
        layout=layout,
    )
    ctx._segments = segments
    if rows is not None:
        ctx.attention_fn = lambda query, layer=None: rows[layer if layer is not None else ctx.layer - 1]
    return ctx


E1, E2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


def test_stage_two_hand_example_prunes_the_demonstrations_globally():
    # positions: 0 text | 1 2 3 demo 0 | 4 text of demo 0 | 5 6 7 demo 1 | 8 text | 9 10 query | 11 12 question
    hidden = torch.zeros(13, 3)
    hidden[[9, 10, 11, 12]] = E1  # the query sample: its mean is e1
    demo = {1: E1, 2: E2, 3: -E1, 5: E2, 6: E1 + E2, 7: -E1}  # cos with e1: 1, 0, -1 | 0, .7071, -1
    for position, vector in demo.items():
        hidden[position] = vector
    hidden[[0, 4, 8]] = E2
    previous = torch.zeros(1, 1, 13)
    current = torch.zeros(1, 1, 13)
    previous[0, 0, [1, 2, 3, 5, 6, 7]] = torch.tensor([0.10, 0.20, 0.0, 0.30, 0.20, 0.0])
    current[0, 0, [1, 2, 3, 5, 6, 7]] = torch.tensor([0.05, 0.60, 0.9, 0.00, 0.25, 0.4])
    # dA = max(0, A_K - A_{K-1}):      0,   .4,  .9  |  0 (not -.3),  .05,  .4
    # S = dA + .6 cos:                 .6,  .4,  .3  |  0,  .05 + .4243 = .4743,  .4 - .6 = -.2
    # R = .5, original counts 4 and 6: the demonstrations keep floor(4 * .5) + floor(6 * .5) = 5 -> all but -.2
    # (without the max(0, .) token 5 would score -.3 and token 7 stay instead)
    ctx = _context(hidden, [1, 2, 3, 5, 6, 7, 9, 10], [0, 0, 0, 1, 1, 1, 2, 2], (4, 6, 4), 3, {2: previous, 3: current})
    keep = CATP(keep=0.5).select_context(ctx)
    # demo 0 keeps 3 tokens, more than its own share floor(4 * .5) = 2: the budget is global
    assert keep.tolist() == [True, True, True, True, True, False, True, True]


def test_stage_two_prime_hand_example_prunes_the_query_by_the_retained_context():
    # positions: 0 text | 1 2 demo 0 | 3 its text | 4 5 6 7 query | 8 question
    hidden = torch.zeros(9, 3)
    hidden[[1, 2]] = E1
    hidden[3] = E1 + 2 * E2  # the context mean: (e1 + e1 + e1 + 2 e2) / 3 = (1, 2/3, 0)
    hidden[0] = -E1  # the prefix is no demonstration's text
    hidden[4], hidden[5], hidden[6], hidden[7] = E1, E2, -E1, E1 + E2
    # cos with (1, 2/3): e1 .832, e2 .555, -e1 -.832, e1 + e2 .981; R = .5 of 4 original -> keep 2: tokens 7, 4
    hidden[8] = -E2
    ctx = _context(hidden, [1, 2, 4, 5, 6, 7], [0, 0, 1, 1, 1, 1], (4, 4), 4)
    keep = CATP(keep=0.5).select_query(ctx)
    assert keep.tolist() == [True, True, True, False, False, True]


# ------------------------------------------------------------------------------------------------ the engine path
def _counts(floor_of: float, counts: list[int]) -> list[int]:
    return [math.floor(c * floor_of + 1e-9) for c in counts]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_counts_per_stage_follow_r_over_two_then_r(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, num_images=[3, 4])
    ratio = 0.778
    with vlm_prune.pruned(model, "catp", keep=1 - ratio) as handle, torch.no_grad():
        model(**inputs)
    diverse, context, query = handle.stats.stages
    assert (diverse.layer, context.layer, query.layer) == (0, 1, 2)  # K = round(6 / 32 * 4) = 1
    for row in range(2):
        original = diverse.tokens_in[row]
        assert diverse.tokens_out[row] == [max(1, c) for c in _counts(1 - ratio / 2, original)]
        demos_after = sum(context.tokens_out[row][:-1])
        assert demos_after == sum(_counts(1 - ratio, original[:-1]))
        assert context.tokens_out[row][-1] == diverse.tokens_out[row][-1]  # the query waits for K + 1
        assert query.tokens_out[row][:-1] == context.tokens_out[row][:-1]
        assert query.tokens_out[row][-1] == _counts(1 - ratio, original[-1:])[0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_rows_with_different_numbers_of_demonstrations_equal_rows_alone(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, num_images=[2, 4, 3], padding="left")
    with vlm_prune.pruned(model, "catp", keep=0.333) as handle, torch.no_grad():
        batch_logits = model(**inputs).logits[:, -1]
        batch_kept = handle.last_kept_index
        for row in range(3):
            alone = single_row(inputs, row)
            logits = model(**alone).logits[:, -1]
            torch.testing.assert_close(logits[0], batch_logits[row], atol=1e-4, rtol=1e-4)
            offset = int(inputs["attention_mask"][row].eq(0).sum())  # left padding
            kept_alone = handle.last_kept_index[0]
            kept_row = batch_kept[row][batch_kept[row] >= offset] - offset
            assert torch.equal(kept_row, kept_alone[kept_alone >= 0])


def test_generate_and_determinism():
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2, num_images=3)
    with vlm_prune.pruned(model, "catp", keep=0.222) as handle, torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = handle.last_kept_index.clone()
        again = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(first, again) and torch.equal(kept, handle.last_kept_index)
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)


def test_a_named_query_prunes_that_item_last():
    model = build_tiny("llava")
    inputs = make_inputs(model, num_images=3)
    with vlm_prune.pruned(model, "catp", keep=0.25, query=0) as handle, torch.no_grad():
        model(**inputs)
    diverse, context, query = handle.stats.stages
    assert context.tokens_out[0][0] == diverse.tokens_out[0][0]  # item 0 is the query: untouched at K
    assert query.tokens_out[0][0] == 4 and sum(context.tokens_out[0][1:]) == 8  # floor(16 * .25) = 4 each


def test_bad_inputs_say_what_to_do():
    model = build_tiny("llava")
    with vlm_prune.pruned(model, "catp", keep=0.25), pytest.raises(InputError, match="divprune"):
        model(**make_inputs(model, num_images=1))
    with vlm_prune.pruned(model, "catp", keep=0.25, query=5), pytest.raises(InputError, match="out of range"):
        model(**make_inputs(model, num_images=3))
    for bad in (dict(keep=1.0), dict(ratio=1.2), dict(ratio=0.0)):
        with pytest.raises(MethodOptionError, match=r"R in \(0, 1\)"):
            vlm_prune.apply(model, "catp", **bad)
    with pytest.raises(MethodOptionError, match="not a count"):
        vlm_prune.apply(model, "catp", keep=64)
    with pytest.raises(MethodOptionError, match="decoder layers"):
        vlm_prune.apply(model, "catp", keep=0.25, layer=3)


def test_k_scales_with_depth():
    method = CATP()
    for depth, k in ((32, 6), (40, 10), (4, 1), (12, 2), (24, 4)):
        method._depth = depth
        assert method.resolved_layer() == k


# ------------------------------------------------------------------------------------------------ Qwen3-VL
def _deep_qwen3_vl(layers: int = 16):
    """The tiny Qwen3-VL toy with `layers` decoder layers: its 3 deepstack layers (0-2) add visual features to the
    LLM, so in-LLM stages need K >= 3; with 16 layers K = round(6 / 32 * 16) = 3 and K + 1 = 4 are interior."""
    from transformers import Qwen3VLForConditionalGeneration

    from vlm_prune.toy_models import build_config

    config = build_config("qwen3_vl")
    config.text_config.num_hidden_layers = layers
    config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def test_catp_on_a_deeper_qwen3_vl_pools_the_demonstrations_after_the_deepstack_layers():
    model = _deep_qwen3_vl()
    assert len(model.config.vision_config.deepstack_visual_indexes) == 3
    inputs = make_inputs(model, batch=2, num_images=[3, 4])
    ratio = 0.778
    with vlm_prune.pruned(model, "catp", keep=1 - ratio) as handle, torch.no_grad():
        batch_logits = model(**inputs).logits[:, -1]
        diverse, context, query = handle.stats.stages
        for row in range(2):
            alone = model(**single_row(inputs, row)).logits[:, -1]
            torch.testing.assert_close(alone[0], batch_logits[row], atol=1e-4, rtol=1e-4)
    assert (diverse.layer, context.layer, query.layer) == (0, 3, 4)
    for row in range(2):
        original = diverse.tokens_in[row]
        assert diverse.tokens_out[row] == [max(1, c) for c in _counts(1 - ratio / 2, original)]
        # stage 2 pools the demonstrations: their total is R's, however it splits between them
        assert sum(context.tokens_out[row][:-1]) == sum(_counts(1 - ratio, original[:-1]))
        assert context.tokens_out[row][-1] == diverse.tokens_out[row][-1]
        assert query.tokens_out[row][-1] == _counts(1 - ratio, original[-1:])[0]
    # the shallow toy cannot host K: a clear error naming the deepstack layers
    shallow = build_tiny("qwen3_vl")
    with pytest.raises(PruneError, match="deepstack features at decoder layers 0..2"):
        vlm_prune.apply(shallow, "catp", keep=0.25)

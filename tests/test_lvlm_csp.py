"""LVLM_CSP and the engine's re-entry and ragged caches, against a hand-built layer-by-layer reference.

The reference (`csp_reference`) runs one unpadded row through the decoder layers by hand, without the engine:
layers < s1 see the text and the representatives, at s1 every visual token re-enters with
h_i = e_i + (h_rep - e_rep), layers >= s2 see the text and the final set. Decode is checked against a FULL
RECOMPUTE: the same reference over the prompt plus the generated tokens (which are text, so present at every
layer); with `trim_cache=True` the generated tokens at layers s1 .. s2 see only the final set (what the
trimmed cache holds), with `trim_cache=False` they see everything those layers computed.
"""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from tests.reference import _rotary, capture, language_model
from vlm_prune.engine.context import Selection
from vlm_prune.engine.ragged import trim_segments
from vlm_prune.errors import BudgetError, MethodOptionError, PruneError
from vlm_prune.methods.base import Method, Stage
from vlm_prune.methods.lvlm_csp import LVLMCSP, cosine_kmeans, medoids, scaled_layers
from vlm_prune.toy_models import build_config, build_tiny, make_inputs, single_row

torch.set_num_threads(1)


def fixed_representatives(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed clustering of n tokens: every third token is a representative, the others map to the previous
    representative (keep mask (n,), represents (n,))."""
    index = torch.arange(n)
    keep = index % 3 == 1
    keep[0] = keep[0] | (not keep.any())
    reps = keep.nonzero(as_tuple=True)[0]
    represents = reps[(torch.searchsorted(reps, index, right=True) - 1).clamp(min=0)]
    return keep, represents


def fixed_final(n: int) -> torch.Tensor:
    """A fixed, irregular final keep mask over n visual tokens (never empty)."""
    keep = (torch.arange(n) * 5 + 2) % 7 < 3
    keep[-1] = True
    return keep


class FixedCSP(Method):
    """Cluster / scatter / prune with fixed selections (test only); `mean=True` enters cluster means."""

    def __init__(self, s1: int, s2: int, mean: bool = False):
        self.s1, self.s2, self.mean = s1, s2, mean

    def cluster(self, ctx):
        keep, represents = fixed_representatives(ctx.num_visual)
        features = None
        if self.mean:
            features = mean_features(ctx.visual_features, keep, represents)
        return Selection(keep_mask=keep, features=features, represents=represents)

    def prune(self, ctx):
        return fixed_final(ctx.num_visual)

    def stages(self):
        return [
            Stage(layer=0, select=self.cluster, name="fixed.cluster"),
            Stage(layer=self.s1, select=self.cluster, name="fixed.scatter", reenter=True),
            Stage(layer=self.s2, select=self.prune, name="fixed.prune"),
        ]


def mean_features(x: torch.Tensor, keep: torch.Tensor, represents: torch.Tensor) -> torch.Tensor:
    reps = keep.nonzero(as_tuple=True)[0]
    return torch.stack([x[represents == r].mean(0) for r in reps])


def additive_mask(visible: torch.Tensor, dtype) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def csp_reference(model, cap, row, s1, s2, extra=(), mean=False, trimmed=False) -> torch.Tensor:
    """Logits (n_out, V) of row `row` of `cap` under fixed cluster / scatter / prune, with `extra` tokens
    appended as text (a full recompute of decoding; preserve positions continue from the unpruned length)."""
    lm = language_model(model)
    cols = cap.attention_mask[row].bool().nonzero(as_tuple=True)[0]
    emb = cap.inputs_embeds[row, cols]
    pos = cap.positions[..., row, cols]
    vis = cap.visual[row, cols].clone()
    if extra:
        new = lm.embed_tokens(torch.tensor(list(extra)))
        start = int(pos.max()) + 1
        extra_pos = torch.arange(start, start + len(extra))
        extra_pos = extra_pos.expand(pos.shape[0], -1) if pos.dim() == 2 else extra_pos
        emb = torch.cat([emb, new])
        pos = torch.cat([pos, extra_pos], dim=-1)
        vis = torch.cat([vis, torch.zeros(len(extra), dtype=torch.bool)])
    n = emb.shape[0]
    is_extra = torch.arange(n) >= n - len(extra)
    vis_index = vis.nonzero(as_tuple=True)[0]
    keep, represents = fixed_representatives(len(vis_index))
    final = fixed_final(len(vis_index))
    entered = emb.clone()
    if mean:
        entered[vis_index[keep]] = mean_features(emb[vis_index], keep, represents)
    present0, present2 = ~vis, ~vis
    present0 = present0.clone()
    present0[vis_index[keep]] = True
    present2 = present2.clone()
    present2[vis_index[final]] = True
    cur = present0.nonzero(as_tuple=True)[0]
    h = entered[cur]
    for i, layer in enumerate(lm.layers):
        if i == s1:
            full = entered.clone()
            full[cur] = h
            rep_columns = vis_index[represents]
            full[vis_index] = full[rep_columns] + emb[vis_index] - entered[rep_columns]
            cur, h = torch.arange(n), full
        if i == s2:
            sel = present2[cur]
            cur, h = cur[sel], h[sel]
        q = len(cur)
        visible = torch.ones(q, q, dtype=torch.bool).tril()
        if trimmed and s1 <= i < s2:
            visible &= ~(is_extra[cur][:, None] & ~present2[cur][None, :])
        cos_sin = _rotary(lm, h[None], pos[..., cur])
        h = layer(
            h[None],
            attention_mask=additive_mask(visible, h.dtype),
            position_embeddings=cos_sin,
            position_ids=torch.arange(q)[None],
        )[0]
    return model.get_output_embeddings()(lm.norm(h))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mean", [False, True])
def test_scatter_reentry_equals_layer_by_layer_reference(family, batch, mean):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=batch, padding="left")
    cap = capture(model, inputs)
    with vlm_prune.pruned(model, FixedCSP(1, 2, mean=mean)) as handle, torch.no_grad():
        logits = model(**inputs).logits
        kept = handle.last_kept_index
        stats = handle.stats
    for row in range(batch):
        reference = csp_reference(model, cap, row, 1, 2, mean=mean)
        slots = kept[row] >= 0
        valid = cap.attention_mask[row].bool()[kept[row].clamp(min=0)] & slots
        torch.testing.assert_close(logits[row, valid], reference, rtol=1e-4, atol=1e-4)
    scatter = stats.stages[1]
    assert scatter.name == "fixed.scatter" and scatter.tokens_out[0][0] > scatter.tokens_in[0][0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("trim_cache", [False, True])
def test_decode_with_ragged_cache_equals_full_recompute(family, trim_cache):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, padding="left")
    cap = capture(model, inputs, mode="generate")
    steps = 3
    with vlm_prune.pruned(model, FixedCSP(1, 3), trim_cache=trim_cache) as handle, torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stats = handle.stats
    generated = out.sequences[:, inputs["input_ids"].shape[1] :]
    for row in range(2):
        for step in range(steps):
            extra = generated[row, :step].tolist()
            reference = csp_reference(model, cap, row, 1, 3, extra=extra, trimmed=trim_cache)[-1]
            torch.testing.assert_close(out.logits[step][row], reference, rtol=1e-4, atol=1e-4)
    assert stats.kv_cache_bytes < stats.kv_cache_bytes_unpruned


@pytest.mark.parametrize("trim_cache", [False, True])
def test_beam_search_on_ragged_cache_equals_full_recompute_of_every_beam(trim_cache):
    """Beam search reorders the ragged cache (rows x beams, different lengths per layer segment): every returned
    beam's score equals the sum of its tokens' log-probabilities under a full recompute of its own sequence."""
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left")
    cap = capture(model, inputs, mode="generate")
    steps, beams = 3, 3
    options = dict(num_beams=beams, num_return_sequences=beams, max_new_tokens=steps, min_new_tokens=steps,
                   length_penalty=0.0, do_sample=False, early_stopping=True, return_dict_in_generate=True,
                   output_scores=True)  # fmt: skip
    with vlm_prune.pruned(model, FixedCSP(1, 3), trim_cache=trim_cache), torch.no_grad():
        out = model.generate(**inputs, **options)
    generated = out.sequences[:, inputs["input_ids"].shape[1] :]
    assert generated.shape == (2 * beams, steps)
    for row in range(2):
        assert len({tuple(t) for t in generated[row * beams : (row + 1) * beams].tolist()}) == beams
        for beam in range(beams):
            tokens = generated[row * beams + beam].tolist()
            total = 0.0
            for step in range(steps):
                logits = csp_reference(model, cap, row, 1, 3, extra=tokens[:step], trimmed=trim_cache)[-1]
                total += float(logits.float().log_softmax(-1)[tokens[step]])
            torch.testing.assert_close(out.sequences_scores[row * beams + beam].item(), total, rtol=1e-4, atol=1e-4)


def test_ragged_cache_lengths_per_layer():
    """Layers < s1 hold text + representatives; s1..s2 all tokens (untrimmed) or the final set; >= s2 final."""
    model = build_tiny("llava")
    inputs = make_inputs(model)
    n = int((inputs["input_ids"] == 3).sum())
    length = inputs["input_ids"].shape[1]
    reps = int(fixed_representatives(n)[0].sum())
    final = int(fixed_final(n).sum())
    for trim_cache, middle in ((False, length), (True, length - n + final)):
        with vlm_prune.pruned(model, FixedCSP(1, 3), trim_cache=trim_cache), torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
        assert lengths == [length - n + reps, middle, middle, length - n + final]


def test_trim_segments_merges_nested_segments_and_keeps_ragged_ones():
    class Entry:
        def __init__(self, length):
            self.keys = torch.arange(length).float().view(1, 1, length, 1)
            self.values = self.keys.clone()

    class Cache:
        layers = [Entry(4), Entry(6), Entry(3)]

    reps, everything, final = torch.tensor([[0, 2, 5, 6]]), torch.arange(7)[None, :6], torch.tensor([[0, 1, 5]])
    cache = Cache()
    segments = trim_segments(cache, [(0, reps), (1, everything), (2, final)], final, 3)
    assert [layer for layer, _ in segments] == [0, 1]
    assert torch.equal(segments[0][1], reps) and torch.equal(segments[1][1], final)
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3]  # ragged: untouched
    assert cache.layers[1].keys.flatten().tolist() == [0, 1, 5]  # slots of columns 0, 1, 5


def deep_qwen3(layers: int = 6):
    from transformers import Qwen3VLForConditionalGeneration

    config = build_config("qwen3_vl")
    config.text_config.num_hidden_layers = layers
    config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


FAMILIES = ["llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lvlm_csp_on_every_toy_family(family):
    """Budgets per stage, batch rows equal rows alone, determinism, the FLOPs report, removal."""
    model = deep_qwen3() if family == "qwen3_vl" else build_tiny(family)
    options = {"s1": 3, "s2": 4} if family == "qwen3_vl" else {}  # after Qwen3-VL's deepstack layers
    inputs = make_inputs(model, batch=2, padding="left")
    with torch.no_grad():
        baseline = model(**inputs).logits
    with vlm_prune.pruned(model, "lvlm_csp", keep=0.25, clusters=0.5, **options) as handle, torch.no_grad():
        batched = model(**inputs).logits
        kept = handle.last_kept_index.clone()
        stats = handle.stats
        assert torch.equal(model(**inputs).logits, batched)
        for row in range(2):
            alone = model(**single_row(inputs, row)).logits[0]
            torch.testing.assert_close(batched[row, -alone.shape[0] :], alone, rtol=1e-4, atol=1e-4)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    cluster, scatter, prune = stats.stages
    from vlm_prune.engine.budget import tokens_to_keep

    for before, reps, back, after in zip(cluster.tokens_in, cluster.tokens_out, scatter.tokens_out, prune.tokens_out):
        assert reps == [tokens_to_keep(0.5, b, b) for b in before]
        assert back == before
        assert after == [tokens_to_keep(0.25, b, b) for b in before]
    assert (kept >= 0).sum() < inputs["attention_mask"].sum()
    assert 0 < stats.image_token_flops_reduction < 1
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, baseline)


def test_image_token_flops_reduction_matches_the_layer_schedule():
    """32-layer schedule (2, 16, 25 %, 10 %): visual tokens per layer average (2*.25 + 14*1 + 16*.1) / 32."""
    from vlm_prune.engine.stats import PruneStats, StageStats

    n = 400
    stats = PruneStats(visual_tokens_in=n, stages=[StageStats("c", 0, [[n]], [[100]])])
    stats.equivalent_average_tokens = (2 * 100 + 14 * n + 16 * 40) / 32
    assert stats.image_token_flops_reduction == pytest.approx(1 - (2 * 0.25 + 14 + 16 * 0.1) / 32)


def test_lvlm_csp_query_is_the_seg_token():
    """The prune stage scores with the attention row of the last [SEG] token, else the last token."""
    method = LVLMCSP(query_token_id=7)

    class Ctx:
        input_ids = torch.tensor([1, 7, 9, 7, 9, 9])
        last_index = 5

    assert method.query_index(Ctx()) == 3
    Ctx.input_ids = torch.tensor([1, 9, 9])
    Ctx.last_index = 2
    assert method.query_index(Ctx()) == 2


@pytest.mark.parametrize("selector", ["random", "uniform"])
@pytest.mark.parametrize("representative", ["medoid", "mean"])
def test_lvlm_csp_selectors_and_representatives(selector, representative):
    model = build_tiny("llava")
    inputs = make_inputs(model)
    with vlm_prune.pruned(model, "lvlm_csp", keep=0.25, selector=selector, representative=representative) as h:
        with torch.no_grad():
            model(**inputs)
    assert [s.total_out for s in h.stats.stages] == [4, 16, 4]


def test_lvlm_csp_dpc_knn_runs():
    model = build_tiny("qwen2_vl")
    with vlm_prune.pruned(model, "lvlm_csp", keep=0.5, cluster_method="dpc_knn") as h, torch.no_grad():
        model(**make_inputs(model))
    assert h.stats.stages[0].name == "lvlm_csp.cluster"


def test_cosine_kmeans_and_medoids_on_separated_directions():
    """Three well separated directions: k-means finds them; each medoid is the member closest to its mean."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.eye(3, 8)
    labels_true = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    x = directions[labels_true] * 3 + 0.05 * torch.randn(9, 8, generator=generator)
    x[3] = directions[0] * 3  # the exact direction: the medoid of cluster 0
    labels = cosine_kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    for a in range(9):
        for b in range(9):
            assert (labels[a] == labels[b]) == (labels_true[a] == labels_true[b])
    assert int(medoids(x, labels, 3)[labels[3]]) == 3


def test_scaled_layer_defaults_and_errors():
    assert scaled_layers(32) == (2, 16)
    assert scaled_layers(8) == (1, 4)
    assert scaled_layers(4) == (1, 2)
    with pytest.raises(MethodOptionError, match="s1 < s2"):
        LVLMCSP(s1=4, s2=4)
    with pytest.raises(MethodOptionError):
        LVLMCSP(selector="cls")
    model = build_tiny("llava")
    with pytest.raises(MethodOptionError, match="below the model"):
        vlm_prune.apply(model, "lvlm_csp", s1=1, s2=4)
    assert not model._forward_pre_hooks
    with vlm_prune.pruned(model, "lvlm_csp", keep=0.25, clusters=1000), pytest.raises(BudgetError, match="clusters"):
        model(**make_inputs(model))
    with vlm_prune.pruned(model, FixedCSP(1, 2), position_policy="compact"), pytest.raises(PruneError, match="pres"):
        model(**make_inputs(model))

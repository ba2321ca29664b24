"""AdaptInfer, its schedules and calibration, and the attention-row recomputation it relies on."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_prune.engine.attention_rows import recompute_attention_rows
from vlm_prune.engine.budget import tokens_to_keep
from vlm_prune.engine.context import IMAGE, SelectionContext, VisualLayout
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.adaptinfer import (
    PRESETS,
    AdaptInfer,
    Schedule,
    adaptinfer_scores,
    cumulative,
    default_layers,
    derive_schedule,
    equivalent_average_tokens,
    text_prior_weights,
)
from vlm_prune.methods.calibration import (
    cross_modal_share,
    inflection_layers,
    load_preset,
    propose_schedule,
    save_preset,
)

transformers = pytest.importorskip("transformers")


class Info:
    def __init__(self, family: str, num_layers: int, name_or_path: str = ""):
        self.family, self.num_layers, self.name_or_path = family, num_layers, name_or_path


# ---------------------------------------------------------------------------------------------------
# Pure functions


def test_text_prior_hand_computed_two_heads():
    a_tt = torch.tensor(
        [
            [[1.0, 0.0], [0.4, 0.6]],  # S = [[1, .4], [.4, .6]]
            [[0.5, 0.0], [0.2, 0.3]],  # S = [[.5, .2], [.2, .3]]
        ]
    )
    w = text_prior_weights(a_tt)
    assert torch.allclose(w, torch.tensor([[1.4, 1.0], [0.7, 0.5]]))


def test_scores_match_brute_force():
    g = torch.Generator().manual_seed(0)
    h, t, length = 3, 4, 12
    rows = torch.softmax(torch.randn(h, t, length, generator=g), dim=-1)
    text_pos = torch.arange(8, 12)
    visual_pos = torch.arange(2, 8)
    scores = adaptinfer_scores(rows, text_pos, visual_pos)
    expected = torch.zeros(visual_pos.numel())
    for head in range(h):
        for i in range(t):
            weight = 0.0
            for j in range(t):
                a_ij = rows[head, i, text_pos[j]]
                a_ji = rows[head, j, text_pos[i]]
                weight += a_ij + a_ji - (a_ij if i == j else 0.0)
            for n, v in enumerate(visual_pos):
                expected[n] += weight * rows[head, i, v]
    assert torch.allclose(scores, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# recompute_attention_rows against eager attention probabilities


def _capture_attention_input(layer_attn):
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["pe"] = kwargs["position_embeddings"]

    return captured, layer_attn.register_forward_pre_hook(hook, with_kwargs=True)


def _tiny(kind: str):
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        from transformers import LlamaConfig, LlamaModel

        return LlamaModel(LlamaConfig(**common, attn_implementation="eager"))
    if kind == "qwen2":
        from transformers import Qwen2Config, Qwen2Model

        config = Qwen2Config(
            **common, use_sliding_window=True, sliding_window=5, max_window_layers=0, attn_implementation="eager"
        )
        return Qwen2Model(config)
    if kind == "qwen3":
        qwen3 = pytest.importorskip("transformers.models.qwen3")
        return qwen3.Qwen3Model(qwen3.Qwen3Config(**common, head_dim=8, attn_implementation="eager"))
    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl import Qwen2VLTextConfig, Qwen2VLTextModel

        config = Qwen2VLTextConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            attn_implementation="eager",
        )
        return Qwen2VLTextModel(config)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen2_vl"])
def test_recomputed_rows_equal_eager_probabilities(kind):
    torch.manual_seed(0)
    model = _tiny(kind).eval()
    if kind == "qwen2":
        with torch.no_grad():  # give the q/k biases some weight so they matter
            for layer in model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    layer_idx = 1
    attn = model.layers[layer_idx].self_attn
    captured, handle = _capture_attention_input(attn)
    batch, length = 2, 12
    ids = torch.randint(0, 64, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    kwargs = {}
    if kind == "qwen2_vl":  # M-RoPE: distinct t/h/w rows
        base = torch.arange(length)
        kwargs["position_ids"] = torch.stack([base, base * 2 % 7, base * 3 % 5])[:, None].expand(3, batch, length)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=True, **kwargs)
    handle.remove()
    eager = out.attentions[layer_idx]  # (B, H, L, L)
    query = torch.tensor([6, 9, 11])
    rows = recompute_attention_rows(attn, captured["hidden"], captured["pe"], query, mask.bool())
    assert rows.shape == (batch, 4, 3, length)
    torch.testing.assert_close(rows, eager[:, :, query].float(), atol=1e-6, rtol=1e-5)
    if kind == "qwen2":  # a sliding-window cache keeps only the window: refused with a clear error
        cache = getattr(out, "cache", None) or out.past_key_values
        with pytest.raises(ValueError, match="sliding"):
            recompute_attention_rows(
                attn, captured["hidden"], captured["pe"], query, mask.bool(), keys=cache.layers[layer_idx].keys
            )
        return
    cache = getattr(out, "cache", None) or out.past_key_values
    cached = cache.layers[layer_idx].keys
    rows_cached = recompute_attention_rows(attn, captured["hidden"], captured["pe"], query, mask.bool(), keys=cached)
    torch.testing.assert_close(rows_cached, rows, atol=1e-6, rtol=1e-5)


def test_legacy_mrope_layout_is_recomposed():
    torch.manual_seed(0)
    model = _tiny("qwen2_vl").eval()
    attn = model.layers[0].self_attn
    hidden = torch.randn(1, 6, 32)
    positions = torch.stack([torch.arange(6), torch.arange(6) % 3, torch.arange(6) % 2])[:, None]
    freqs = positions[..., None].float() * model.rotary_emb.inv_freq  # (3, 1, 6, 4)
    emb = torch.cat([freqs, freqs], dim=-1)
    legacy = (emb.cos(), emb.sin())
    modern = model.rotary_emb(hidden, positions)
    query = torch.arange(6)
    a = recompute_attention_rows(attn, hidden, legacy, query, None, mrope_section=[2, 1, 1])
    b = recompute_attention_rows(attn, hidden, modern, query, None)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_adaptinfer_scores_from_recomputed_rows_equal_eager_brute_force():
    """Scores from text rows recomputed from q/k == the authors' formula on the full eager matrix."""
    torch.manual_seed(1)
    model = _tiny("llama").eval()
    attn = model.layers[2].self_attn
    captured, handle = _capture_attention_input(attn)
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    handle.remove()
    v_start, v_num = 3, 10
    text_start = v_start + v_num
    text_index = torch.arange(text_start, 20)
    rows = recompute_attention_rows(attn, captured["hidden"], captured["pe"], text_index, None)[0]
    ours = adaptinfer_scores(rows, text_index, torch.arange(v_start, text_start))
    # The authors' attn_postprocess_topk_with_t2t_weighting (lb = 1) on eager probabilities.
    weights = out.attentions[2].float()  # (1, H, L, L)
    t2t = weights[:, :, text_start:, text_start:]
    t2t_2 = t2t + t2t.transpose(-1, -2) - torch.diag_embed(torch.diagonal(t2t, dim1=-2, dim2=-1))
    importance = t2t_2.sum(dim=2)
    t2v = weights[:, :, text_start:, v_start:text_start]
    reference = (importance.unsqueeze(-2) @ t2v).squeeze(-2).sum(dim=1)[0]
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Schedules and the method


def _context(num_visual: int, budget: int, prefix: int = 5, text: int = 7, heads: int = 2, seed: int = 0):
    length = prefix + num_visual + text
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(heads, length, length, generator=g)

    def attention_fn(query_index: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[:, query_index], dim=-1)

    layout = VisualLayout(
        media_index=torch.zeros(num_visual, dtype=torch.long),
        kind=torch.full((num_visual,), IMAGE),
        frame=torch.zeros(num_visual, dtype=torch.long),
        grid_thw=torch.zeros(num_visual, 3, dtype=torch.long),
        media_grid=[(1, 1, num_visual)],
    )
    return SelectionContext(
        layer=1,
        num_visual=num_visual,
        budget=budget,
        budget_per_media=[budget],
        visual_features=torch.zeros(num_visual, 4),
        hidden_states=torch.zeros(length, 4),
        visual_index=torch.arange(prefix, prefix + num_visual),
        input_ids=torch.zeros(length, dtype=torch.long),
        layout=layout,
        attention_fn=attention_fn,
    )


def _run_stages(method: AdaptInfer, n: int) -> list[int]:
    counts, current = [], n
    for i, stage in enumerate(method.stages()):
        budget = tokens_to_keep(stage.keep, n, current)
        mask = stage.select(_context(current, budget, seed=i))
        assert mask.dtype == torch.bool and mask.shape == (current,)
        current = int(mask.sum())
        counts.append(current)
    return counts


@pytest.mark.parametrize(
    "keep, expected",
    [(128, [290, 72, 18]), (64, [133, 27, 3]), (128 / 576, [290, 72, 18]), (64 / 576, [133, 27, 3])],
)
def test_llava_presets_keep_exact_counts(keep, expected):
    method = AdaptInfer(keep=keep).bind(Info("llava", 32, "llava-hf/llava-1.5-7b-hf"))
    assert [s.layer for s in method.stages()] == [2, 11, 21]
    assert all(s.needs == frozenset({"attention"}) for s in method.stages())
    assert _run_stages(method, 576) == expected


@pytest.mark.parametrize("label, ratios", [(10, [0.17, 0.6, 0.3]), (30, [0.5, 0.6, 0.3]), (50, [0.7, 0.9, 0.3])])
def test_qwen2_vl_presets(label, ratios):
    method = AdaptInfer(keep=label / 100).bind(Info("qwen2_vl", 28, "Qwen/Qwen2-VL-2B-Instruct"))
    stages = method.stages()
    assert [s.layer for s in stages] == [1, 10, 20]
    assert [s.keep for s in stages] == pytest.approx([math.prod(ratios[: i + 1]) for i in range(3)])
    n = 1024
    expected = [math.floor(math.prod(ratios[: i + 1]) * n + 0.5) for i in range(3)]
    assert _run_stages(method, n) == expected


def test_equivalent_average_tokens():
    llava128 = PRESETS["llava-1.5-7b/128"]
    assert equivalent_average_tokens(llava128, 32, 576, authors_convention=True) == pytest.approx(4122 / 32)
    assert equivalent_average_tokens(llava128, 32, 576) == pytest.approx((2 * 576 + 9 * 290 + 10 * 72 + 11 * 18) / 32)
    assert equivalent_average_tokens(PRESETS["llava-1.5-7b/64"], 32, 576, authors_convention=True) == pytest.approx(
        2079 / 32
    )
    qwen10 = PRESETS["qwen2-vl/10"]
    expected = (9 * 0.17 + 10 * 0.17 * 0.6 + 9 * 0.17 * 0.6 * 0.3) / 28
    assert equivalent_average_tokens(qwen10, 28, 1, authors_convention=True) == pytest.approx(expected)
    assert expected == pytest.approx(0.1, abs=0.002)
    hand = Schedule((4, 8), (0.5, 0.25))
    assert equivalent_average_tokens(hand, 16, 100) == pytest.approx((4 * 100 + 4 * 50 + 8 * 25) / 16)


@pytest.mark.parametrize(
    ("layers", "keep", "message"),
    [((), (), "as many layers as keeps"), ((2, 4), (0.5,), "as many layers as keeps"),
     ((4, 2), (0.5, 0.25), "strictly increasing"), ((0, 2), (0.5, 0.25), ">= 1")],
)  # fmt: skip
def test_malformed_schedule_is_a_method_option_error(layers, keep, message):
    with pytest.raises(MethodOptionError, match=message):
        Schedule(layers, keep)


def test_derived_schedule_rule():
    assert default_layers(32) == (2, 11, 21)
    assert default_layers(28) == (2, 9, 19)
    assert default_layers(4) == (1, 2, 3)
    assert default_layers(2) == (1,)
    for num_layers, keep in [(32, 0.25), (28, 0.1), (24, 0.5), (4, 0.6)]:
        schedule = derive_schedule(keep, num_layers)
        assert equivalent_average_tokens(schedule, num_layers, 1) == pytest.approx(keep, abs=1e-9)
        ratios = schedule.ratios()
        assert all(r == pytest.approx(ratios[0]) for r in ratios)
    low = derive_schedule(0.05, 32)  # below 2/32: the first stage moves to layer 1
    assert low.layers[0] == 1
    assert equivalent_average_tokens(low, 32, 1) == pytest.approx(0.05, abs=1e-9)
    with pytest.raises(BudgetError):
        derive_schedule(1 / 40, 32)


def test_bind_picks_preset_or_derives():
    assert (
        AdaptInfer(keep=0.25).bind(Info("llava", 32, "llava-hf/llava-1.5-7b-hf")).resolve_schedule().source == "derived"
    )
    method = AdaptInfer(keep=0.3).bind(Info("qwen2_5_vl", 36, "Qwen/Qwen2.5-VL-3B-Instruct"))
    assert [s.layer for s in method.stages()] == [2, 12, 24]
    assert AdaptInfer(keep=0.25, num_layers=32).resolve_schedule().layers == (2, 11, 21)
    explicit = AdaptInfer(layers=[3, 6], ratios=[0.5, 0.5]).stages()
    assert [(s.layer, s.keep) for s in explicit] == [(3, 0.5), (6, 0.25)]
    assert AdaptInfer(preset="llava-1.5-13b/64").resolve_schedule().keep == (148, 40, 5)
    with pytest.raises(BudgetError):
        AdaptInfer(keep=100).bind(Info("qwen2_vl", 28)).stages()
    with pytest.raises(BudgetError):
        AdaptInfer(keep=0.25).stages()  # no depth known
    with pytest.raises(BudgetError):
        AdaptInfer(preset="llava-1.5-7b/128").bind(Info("llama", 16)).stages()


def test_registered():
    from vlm_prune.methods.registry import get_method

    method = get_method("adaptinfer", keep=0.2, num_layers=16)
    assert isinstance(method, AdaptInfer)
    assert cumulative([0.5, 0.5]) == (0.5, 0.25)


# ---------------------------------------------------------------------------------------------------
# Calibration


def test_cross_modal_share_and_inflections():
    rows = torch.zeros(2, 1, 6)
    rows[0, 0] = torch.tensor([0.5, 0.3, 0.1, 0.0, 0.1, 0.0])  # sink 0.5, visual 0.4, text 0.1
    rows[1, 0] = torch.tensor([0.0, 0.1, 0.1, 0.2, 0.3, 0.3])  # visual 0.4, text 0.6
    share = cross_modal_share(rows, torch.tensor([1, 2, 3]), torch.tensor([4, 5]))
    assert share == pytest.approx(0.8 / 1.5)
    shares = [0.9, 0.85, 0.3, 0.28, 0.27, 0.26, 0.5, 0.5, 0.49, 0.1, 0.1, 0.1]
    # deltas: 0.05, 0.55, 0.02, 0.01, 0.01, 0.24, 0, 0.01, 0.39, 0, 0 -> l = 1, 8, 5
    assert inflection_layers(shares, n=3, min_gap=2) == [1, 5, 8]
    assert inflection_layers(shares, n=3, min_gap=4) == [1, 8]  # 5 is too close to 8
    assert inflection_layers(shares, n=2, min_gap=8) == [1]
    schedule = propose_schedule(shares, keep=0.4, n_stages=3, min_gap=2)
    assert schedule.layers == (2, 6, 9)
    assert equivalent_average_tokens(schedule, len(shares), 1) == pytest.approx(0.4, abs=1e-9)


def test_preset_roundtrip(tmp_path):
    schedule = Schedule((2, 6, 9), (0.5, 0.25, 0.125), "calibrated")
    path = save_preset(tmp_path / "p.json", schedule, model="tiny", num_layers=12, shares=[0.1] * 12)
    assert load_preset(path).layers == (2, 6, 9)
    assert load_preset(path).keep == (0.5, 0.25, 0.125)
    method = AdaptInfer(preset=str(path))
    assert [s.layer for s in method.stages()] == [2, 6, 9]


def test_calibrate_runner_on_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_prune.calibrate_runner import calibrate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    media = 7
    ids = torch.randint(10, 64, (2, 24))
    ids[:, 3:15] = media
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        result = calibrate(model, [{"input_ids": ids, "attention_mask": mask}], keep=0.5, media_ids=[media])
    assert result["num_layers"] == 8 and result["samples"] == 2
    assert all(0.0 <= s <= 1.0 for s in result["shares"])
    assert len(result["schedule"]["layers"]) >= 1
    assert model.config._attn_implementation == "sdpa"  # restored

"""AdaToken-3D: hand-computed scores, schedules and calibration, and the method inside the engine on a toy VLM."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.engine.context import IMAGE, SelectionContext, VisualLayout
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.adaptinfer import equivalent_average_tokens
from vlm_prune.methods.adatoken3d import (
    AdaToken3D,
    authors_schedule,
    derive_schedule,
    last_token_scores,
    load_preset,
    low_contribution_fraction,
    needed_fractions,
    propose_schedule,
    save_preset,
    scaled_layers,
    schedule_from_ratios,
    spatial_share,
)


class Info:
    def __init__(self, num_layers: int, name_or_path: str = "", family: str = "llava"):
        self.family, self.num_layers, self.name_or_path = family, num_layers, name_or_path


def test_last_token_scores_hand_computed():
    rows = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.3, 0.4, 0.1, 0.2]]])  # (H=2, 1, L=4)
    scores = last_token_scores(rows, torch.tensor([1, 2]))
    torch.testing.assert_close(scores, torch.tensor([0.3, 0.2]))
    with pytest.raises(ValueError):
        last_token_scores(rows[:, :, :2].expand(2, 2, 2), torch.tensor([0]))


def test_authors_schedule_scaled_to_depth():
    assert scaled_layers(32) == (8, 16, 24)
    assert scaled_layers(8) == (2, 4, 6)
    assert scaled_layers(12) == (3, 6, 9)
    assert scaled_layers(3) == (1, 2)  # 0.75 * 3 rounds to 2, which is taken: 3 would be the end
    sched = authors_schedule(32)
    assert sched.layers == (8, 16, 24) and sched.keep == (0.5, 0.25, 0.125)
    # (8 * 1 + 8 * 0.5 + 8 * 0.25 + 8 * 0.125) / 32 = 15 / 32
    assert equivalent_average_tokens(sched, 32, 1) == pytest.approx(15 / 32)
    derived = derive_schedule(15 / 32, 32)
    assert derived.layers == (8, 16, 24)
    assert derived.keep == pytest.approx((0.5, 0.25, 0.125), abs=1e-9)
    with pytest.raises(BudgetError):
        derive_schedule(0.01, 32)
    assert schedule_from_ratios([8, 16, 24], [1, 0.5, 0.25, 0.125]).keep == (0.5, 0.25, 0.125)
    with pytest.raises(MethodOptionError):
        schedule_from_ratios([8, 16], [0.5, 0.75])  # increasing
    with pytest.raises(MethodOptionError):
        schedule_from_ratios([8, 16], [0.9, 0.5, 0.25])  # three ratios for two layers must start at 1


def test_calibration_pure_functions_hand_computed():
    # sorted 0.01, 0.02, 0.03, 0.44, 0.5: running shares 0.01, 0.03, 0.06, ... -> two of five under 5 %
    assert low_contribution_fraction(torch.tensor([0.5, 0.03, 0.01, 0.44, 0.02])) == pytest.approx(0.4)
    assert low_contribution_fraction(torch.tensor([0.25, 0.25, 0.25, 0.25])) == 0.0
    rows = torch.zeros(2, 1, 6)
    rows[0, 0] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    rows[1, 0] = torch.tensor([0.7, 0.0, 0.1, 0.0, 0.1, 0.1])
    # head mean: 0.6, 0.05, 0.1, 0.05, 0.1, 0.1; spatial = positions 1..3 -> 0.2
    assert spatial_share(rows, torch.tensor([1, 2, 3])) == pytest.approx(0.2)
    assert needed_fractions([0.5, 0.01], [0.6, 0.6], min_share=0.02, min_keep=0.05) == pytest.approx([0.4, 0.05])


def test_propose_schedule_hand_computed():
    shares = [0.5, 0.5, 0.5, 0.5]
    low = [0.0, 0.5, 0.75, 0.9]  # needs 1, 0.5, 0.25, 0.1 (non-increasing, so the suffix max is itself)
    sched = propose_schedule(shares, low, 3)
    assert sched.layers == (1, 2, 3) and sched.keep == pytest.approx((0.5, 0.25, 0.1))
    # two stages: (1, 2) costs 1 + 0.5 + 2 * 0.25 = 2.0, (1, 3) 1 + 2 * 0.5 + 0.1 = 2.1, (2, 3) 2 + 0.25 + 0.1
    sched = propose_schedule(shares, low, 2)
    assert sched.layers == (1, 2) and sched.keep == pytest.approx((0.5, 0.25))
    # a late layer that needs many tokens holds the earlier stages up (suffix max)
    sched = propose_schedule(shares, [0.0, 0.9, 0.9, 0.4], 1)
    assert sched.layers == (1,) and sched.keep == pytest.approx((0.6,))
    # a layer with almost no attention on spatial tokens does not constrain: min_keep
    sched = propose_schedule([0.5, 0.5, 0.001, 0.001], [0.0, 0.5, 0.0, 0.0], 2, min_keep=0.05)
    assert sched.layers == (1, 2) and sched.keep == pytest.approx((0.5, 0.05))


def test_preset_roundtrip_and_resolution(tmp_path):
    path = save_preset(tmp_path / "p.json", propose_schedule([0.5] * 4, [0.0, 0.5, 0.75, 0.9], 3), keep=0.4)
    loaded = load_preset(path)
    assert loaded.layers == (1, 2, 3) and loaded.keep == pytest.approx((0.5, 0.25, 0.1))
    method = AdaToken3D(preset=str(path)).bind(Info(4))
    assert [s.layer for s in method.stages()] == [1, 2, 3]
    assert [s.keep for s in method.stages()] == pytest.approx([0.5, 0.25, 0.1])
    assert AdaToken3D().bind(Info(32)).resolve_schedule().keep == (0.5, 0.25, 0.125)
    assert AdaToken3D(preset="authors").bind(Info(8)).resolve_schedule().layers == (2, 4, 6)
    assert AdaToken3D(keep=0.3).bind(Info(8)).resolve_schedule().source == "derived"
    with pytest.raises(BudgetError):
        AdaToken3D(keep=64).bind(Info(8)).resolve_schedule()
    with pytest.raises(BudgetError):
        AdaToken3D(preset=str(path)).bind(Info(3)).stages()  # layer 3 does not fit 3 layers
    with pytest.raises(BudgetError):
        AdaToken3D(preset=str(tmp_path / "missing.json")).bind(Info(8)).stages()
    with pytest.raises(MethodOptionError):
        AdaToken3D(attention_layer="first")


def test_select_keeps_top_attended_per_media_in_order():
    n, prefix, length = 6, 2, 10
    row = torch.zeros(2, 1, length)
    row[0, 0, prefix : prefix + n] = torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25, 0.1])
    row[1, 0, prefix : prefix + n] = torch.tensor([0.1, 0.1, 0.05, 0.3, 0.25, 0.2])
    seen = {}

    def attention_fn(query, layer=None):
        seen["query"], seen["layer"] = query.tolist(), layer
        return row

    layout = VisualLayout(
        media_index=torch.tensor([0, 0, 0, 1, 1, 1]),
        kind=torch.full((n,), IMAGE),
        frame=torch.zeros(n, dtype=torch.long),
        grid_thw=torch.zeros(n, 3, dtype=torch.long),
        media_grid=[(1, 1, 3), (1, 1, 3)],
    )
    ctx = SelectionContext(
        layer=4, num_visual=n, budget=2, budget_per_media=[1, 1], visual_features=torch.zeros(n, 4),
        hidden_states=torch.zeros(length, 4), visual_index=torch.arange(prefix, prefix + n),
        input_ids=torch.zeros(length, dtype=torch.long), layout=layout, attention_fn=attention_fn,
    )  # fmt: skip
    # head means 0.1, 0.2, 0.05 | 0.25, 0.25, 0.15: item 0 keeps token 1, item 1 the earlier of the tie (3)
    assert AdaToken3D().select(ctx).tolist() == [False, True, False, True, False, False]
    assert seen == {"query": [length - 1], "layer": 4}  # the last token, layer k's own q/k
    AdaToken3D(attention_layer="previous").select(ctx)
    assert seen["layer"] is None  # the context serves layer k - 1 by default


def _first_stage_reference(model, inputs, layer: int, keep: float) -> list[int]:
    """Kept visual columns of a one-stage gate from eager attention of the unpruned model (the brute force)."""
    from vlm_prune.toy_models import IMAGE_ID

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    attn = out.attentions[layer][0, :, -1, :].mean(0)  # last token, head mean, over the whole sequence
    visual = (inputs["input_ids"][0] == IMAGE_ID).nonzero(as_tuple=True)[0]
    budget = int(keep * len(visual) + 0.5)
    top = torch.sort(attn[visual], descending=True, stable=True).indices[:budget]
    return sorted(visual[top].tolist())


def _engine_first_stage(model, inputs, layer: int) -> list[int]:
    """The sorted visual columns the engine keeps in row 0 after one AdaToken-3D stage at `layer` keeping 1/2."""
    from vlm_prune.toy_models import IMAGE_ID

    with vlm_prune.pruned(model, "adatoken3d", layers=[layer], ratios=[1.0, 0.5]) as handle:
        with torch.no_grad():
            model(**inputs)
        kept = handle.last_kept_index[0]
    return sorted(c for c in kept.tolist() if c >= 0 and inputs["input_ids"][0, c] == IMAGE_ID)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_engine_gate_equals_eager_reference_on_toy_models(family):
    from vlm_prune.toy_models import IMAGE_ID, build_tiny, make_inputs

    model = build_tiny(family, seed=1)
    inputs = make_inputs(model, batch=1, seed=2)
    n = int((inputs["input_ids"] == IMAGE_ID).sum())
    assert _engine_first_stage(model, inputs, 2) == _first_stage_reference(model, inputs, 2, 0.5)
    # the default schedule on a 4-layer toy: stages at 1, 2, 3 with 1/2, 1/4, 1/8 (at least one token)
    with vlm_prune.pruned(model, "adatoken3d") as handle:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        stages = handle.stats.stages
    assert [s.layer for s in stages] == [1, 2, 3]
    assert [s.total_out for s in stages] == [max(1, int(f * n + 0.5)) for f in (0.5, 0.25, 0.125)]


def test_calibrate_runner_matches_eager_attention_on_a_toy_vlm():
    """The runner's per-layer shares and low fractions equal the same measures on eager attention."""
    from vlm_prune.calibrate_runner import calibrate_adatoken3d
    from vlm_prune.toy_models import IMAGE_ID, build_tiny, make_inputs

    model = build_tiny("llava", seed=3)
    inputs = make_inputs(model, batch=2, padding="left", seed=4)
    result = calibrate_adatoken3d(model, [inputs], n_stages=2, mass=0.05, media_ids=[IMAGE_ID])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    shares, lows = [], []
    for b in range(2):
        visual = (inputs["input_ids"][b] == IMAGE_ID).nonzero(as_tuple=True)[0]
        per_layer = [a[b, :, -1:, :] for a in out.attentions]  # (H, 1, L) of the last (real) token
        shares.append([spatial_share(r, visual) for r in per_layer])
        lows.append([low_contribution_fraction(r.mean(0)[0, visual], 0.05) for r in per_layer])
    assert result["samples"] == 2 and result["num_layers"] == 4
    assert result["shares"] == pytest.approx(torch.tensor(shares).mean(0).tolist(), abs=1e-5)
    assert result["low_fractions"] == pytest.approx(torch.tensor(lows).mean(0).tolist(), abs=1e-6)
    expected = propose_schedule(result["shares"], result["low_fractions"], 2)
    assert tuple(result["schedule"]["layers"]) == expected.layers
    assert model.config._attn_implementation == "sdpa"


def test_engine_gate_on_tiny_llava3d_scene_tokens():
    """On LLaVA-3D the spatial tokens are the scene's voxel tokens: the first stage equals the eager brute force,
    and the default schedule of an 8-layer model prunes at 2, 4, 6 per row of a padded batch."""
    from vlm_prune.models.llava3d.tiny import build_tiny_llava3d, make_scene_inputs, single_scene_row
    from vlm_prune.toy_models import IMAGE_ID

    model = build_tiny_llava3d(num_layers=8, seed=2)
    batch = make_scene_inputs(model, batch=2, padding="left", seed=5)
    alone = single_scene_row(batch, 1)
    assert _engine_first_stage(model, alone, 3) == _first_stage_reference(model, alone, 3, 0.5)
    counts = (batch["input_ids"] == IMAGE_ID).sum(1).tolist()
    with vlm_prune.pruned(model, "adatoken3d") as handle:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        stages = handle.stats.stages
    assert [s.layer for s in stages] == [2, 4, 6]
    expected = [sum(max(1, int(f * n + 0.5)) for n in counts) for f in (0.5, 0.25, 0.125)]
    assert [s.total_out for s in stages] == expected


def test_shipped_calibrated_preset_of_the_scene_demo_model_resolves():
    """The scene3d demo model ships its `vlm-prune calibrate --method adatoken3d` preset; bound to that folder,
    AdaToken-3D picks it at its equivalent average budget (recomputed here from the stages) and nowhere else."""
    import json
    from pathlib import Path

    from vlm_prune.methods.adaptinfer import Schedule
    from vlm_prune.methods.adatoken3d import DEMO_PRESET_FOLDER, demo_preset

    folder = Path(vlm_prune.__file__).parent / "demo_models" / "llava3d_scene"
    preset = folder / DEMO_PRESET_FOLDER / "calibrated.json"
    if not preset.is_file():
        pytest.skip("the scene3d demo model is not built (benchmarks/train_scene3d_model.py)")
    data = json.loads(preset.read_text())
    depth = data["num_layers"]
    eq = equivalent_average_tokens(Schedule(tuple(data["layers"]), tuple(data["stage_keep"])), depth, 1)
    assert abs(eq - data["keep"]) < 1e-3
    info = Info(depth, str(folder))
    assert demo_preset(info, data["keep"]) == preset
    assert demo_preset(info, 0.5) is None and demo_preset(Info(depth + 1, str(folder)), data["keep"]) is None
    assert AdaToken3D(keep=data["keep"]).bind(info).resolve_schedule().layers == tuple(data["layers"])

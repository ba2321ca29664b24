"""Baseline methods (random, pool, fastv, divprune), top-k helpers and the registry, on hand-built
SelectionContexts (no model)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlm_prune.engine.context import IMAGE, VIDEO, Selection, SelectionContext, VisualLayout
from vlm_prune.errors import BudgetError, MethodOptionError, PruneError, UnknownMethodError
from vlm_prune.methods import available, get_method, get_methods, parse_spec, register
from vlm_prune.methods.base import Method, topk_mask, topk_mask_per_media
from vlm_prune.methods.divprune import DivPrune, maxmin_diversity
from vlm_prune.methods.fastv import FastV, last_token_attention_scores
from vlm_prune.methods.pool import PoolPrune, assign_cells, pool_grid, pool_layout
from vlm_prune.methods.random import RandomPrune

# ----------------------------------------------------------------------------- helpers


def grid_layout(grids: list[tuple[int, int, int]], kind: int = IMAGE) -> VisualLayout:
    """Layout of media items laid out one after the other, each a full (T, H, W) grid, row-major."""
    media, frames, coords = [], [], []
    for item, (t_len, h_len, w_len) in enumerate(grids):
        for t, h, w in itertools.product(range(t_len), range(h_len), range(w_len)):
            media.append(item)
            frames.append(t)
            coords.append((t, h, w))
    n = len(media)
    return VisualLayout(
        media_index=torch.tensor(media, dtype=torch.long),
        kind=torch.full((n,), kind, dtype=torch.long),
        frame=torch.tensor(frames, dtype=torch.long),
        grid_thw=torch.tensor(coords, dtype=torch.long).reshape(n, 3),
        media_grid=list(grids),
    )


def make_ctx(
    features: torch.Tensor,
    layout: VisualLayout,
    budget_per_media: list[int] | None,
    *,
    layer: int = 0,
    seed: int = 0,
    text_before: int = 0,
    text_after: int = 3,
    **extra,
) -> SelectionContext:
    """A context whose sequence is [text_before text tokens, the visual tokens, text_after tokens]."""
    n, d = features.shape
    device = features.device
    length = text_before + n + text_after
    hidden = torch.zeros(length, d, dtype=features.dtype, device=device)
    visual_index = torch.arange(text_before, text_before + n, device=device)
    hidden[visual_index] = features
    layout = VisualLayout(
        media_index=layout.media_index.to(device),
        kind=layout.kind.to(device),
        frame=layout.frame.to(device),
        grid_thw=layout.grid_thw.to(device),
        media_grid=list(layout.media_grid),
    )
    return SelectionContext(
        layer=layer,
        num_visual=n,
        budget=None if budget_per_media is None else sum(budget_per_media),
        budget_per_media=budget_per_media,
        visual_features=features,
        hidden_states=hidden,
        visual_index=visual_index,
        input_ids=torch.zeros(length, dtype=torch.long, device=device),
        layout=layout,
        seed=seed,
        **extra,
    )


def mask_of(result: torch.Tensor | Selection) -> torch.Tensor:
    return result.keep_mask if isinstance(result, Selection) else result


# ----------------------------------------------------------------------------- top-k


def test_topk_ties_go_to_earlier_tokens():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_mask(scores, 2).nonzero().flatten().tolist() == [1, 2]
    assert topk_mask(scores, 3).nonzero().flatten().tolist() == [1, 2, 4]
    assert topk_mask(torch.zeros(4), 2).nonzero().flatten().tolist() == [0, 1]
    assert topk_mask(scores, 99).all() and not topk_mask(scores, 0).any()


def test_topk_per_media_ties_and_budgets():
    scores = torch.tensor([5.0, 5.0, 1.0, 0.0, 7.0, 7.0, 7.0])
    media = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    keep = topk_mask_per_media(scores, media, [1, 2])
    assert keep.nonzero().flatten().tolist() == [0, 4, 5]


# ----------------------------------------------------------------------------- random


def test_random_count_and_determinism():
    layout = grid_layout([(1, 6, 6), (1, 4, 5)])
    feats = torch.randn(len(layout), 8)
    method = RandomPrune(keep=0.25)
    masks = [mask_of(method.select(make_ctx(feats, layout, [9, 5], seed=7))) for _ in range(3)]
    for mask in masks:
        assert mask.dtype == torch.bool and mask.shape == (56,)
        assert int(mask[:36].sum()) == 9 and int(mask[36:].sum()) == 5
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    # the choice depends on the sample's seed (and stage), not on anything batch-related
    other = mask_of(method.select(make_ctx(feats, layout, [9, 5], seed=8)))
    assert not torch.equal(other, masks[0])
    shifted = mask_of(method.select(make_ctx(feats, layout, [9, 5], seed=7, text_before=11)))
    assert torch.equal(shifted, masks[0])


def test_random_per_item_draws_each_item_as_if_alone():
    """per_item=True: an item keeps what it keeps alone (the vLLM plugin's rule); the default draws in sequence."""
    grids = [(1, 6, 6), (1, 4, 5)]
    feats = torch.randn(56, 8)
    ctx = make_ctx(feats, grid_layout(grids), [9, 5], seed=7)
    together = mask_of(RandomPrune(keep=0.25, per_item=True).select(ctx))
    alone = mask_of(RandomPrune(keep=0.25).select(make_ctx(feats[36:], grid_layout(grids[1:]), [5], seed=7)))
    assert torch.equal(together[36:], alone) and int(together[:36].sum()) == 9
    sequential = mask_of(RandomPrune(keep=0.25).select(make_ctx(feats, grid_layout(grids), [9, 5], seed=7)))
    assert torch.equal(sequential[:36], together[:36]) and not torch.equal(sequential[36:], alone)


def test_random_budget_larger_than_item_keeps_all():
    layout = grid_layout([(1, 2, 2)])
    mask = mask_of(RandomPrune().select(make_ctx(torch.randn(4, 3), layout, [10])))
    assert mask.all()


# ----------------------------------------------------------------------------- pool


@pytest.mark.parametrize("height,width", [(24, 24), (18, 32), (5, 7), (1, 9), (27, 27)])
def test_pool_layout_is_a_tiling_with_exact_count(height, width):
    for budget in range(1, height * width + 1):
        layout = pool_layout(height, width, budget)
        assert sum(layout) == budget
        assert 1 <= len(layout) <= height and all(1 <= c <= width for c in layout)
        assert max(layout) - min(layout) <= 1


def test_pool_layout_regular_cases():
    assert pool_layout(24, 24, 64) == [8] * 8
    assert pool_layout(24, 24, 144) == [12] * 12
    assert pool_layout(24, 24, 576) == [24] * 24
    assert pool_layout(18, 32, 144) == [16] * 9
    assert pool_layout(24, 24, 128) == [16] * 8  # 8 x 16 is within 2x of square
    # 23 is prime; 1 x 23 is too skewed, so ragged rows are used
    ragged = pool_layout(24, 24, 23)
    assert sum(ragged) == 23 and len(ragged) in (4, 5)


def test_pool_exact_counts_on_full_grids():
    layout = grid_layout([(1, 24, 24)])
    feats = torch.randn(576, 4)
    for budget in [*range(1, 577, 13), 64, 128, 144, 192, 575, 576]:
        result = PoolPrune().select(make_ctx(feats, layout, [budget]))
        assert isinstance(result, Selection)
        assert int(result.keep_mask.sum()) == budget
        assert result.features.shape == (budget, 4)


def test_pool_features_are_cell_means_at_centre_tokens():
    layout = grid_layout([(1, 6, 6)])
    feats = torch.randn(36, 5)
    result = PoolPrune().select(make_ctx(feats, layout, [4]))
    # 2 x 2 cells of 3 x 3; centre tokens (1,1), (1,4), (4,1), (4,4)
    assert result.keep_mask.nonzero().flatten().tolist() == [7, 10, 25, 28]
    grid = feats.reshape(2, 3, 2, 3, 5)
    expected = grid.mean(dim=(1, 3)).reshape(4, 5)
    torch.testing.assert_close(result.features, expected)


def test_pool_even_cells_pick_earliest_nearest_token():
    layout = grid_layout([(1, 4, 4)])
    feats = torch.arange(16.0).unsqueeze(1)
    result = PoolPrune().select(make_ctx(feats, layout, [4]))
    assert result.keep_mask.nonzero().flatten().tolist() == [0, 2, 8, 10]
    assert result.features.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pool_ragged_layout_means_partition_the_grid():
    layout = grid_layout([(1, 5, 5)])
    feats = torch.randn(25, 3, dtype=torch.float64)
    result = PoolPrune().select(make_ctx(feats, layout, [7]))
    assert int(result.keep_mask.sum()) == 7
    cells_layout = pool_layout(5, 5, 7)
    cell, _ = assign_cells(layout.grid_thw[:, 1], layout.grid_thw[:, 2], 5, 5, cells_layout)
    assert cell.unique().numel() == 7
    kept = result.keep_mask.nonzero().flatten()
    # every kept token is the representative of a distinct cell, with that cell's mean
    assert cell[kept].unique().numel() == 7
    for token, feature in zip(kept.tolist(), result.features, strict=True):
        torch.testing.assert_close(feature, feats[cell == cell[token]].mean(0))


def test_pool_video_per_frame_and_multi_media():
    layout = grid_layout([(3, 4, 4), (1, 4, 4)], kind=VIDEO)
    feats = torch.randn(len(layout), 6)
    result = PoolPrune().select(make_ctx(feats, layout, [7, 4]))
    keep = result.keep_mask
    per_frame = [int(keep[i * 16 : (i + 1) * 16].sum()) for i in range(4)]
    assert per_frame == [2, 2, 3, 4]  # 7 over 3 frames: floor((f+1)7/3) - floor(f 7/3)
    # features are the means of the frame's cells: frame 0 with 2 cells -> 1 x 2 halves (4 rows x 2 cols)
    frame0 = feats[:16].reshape(4, 2, 2, 6)
    torch.testing.assert_close(result.features[:2], frame0.mean(dim=(0, 2)))


def test_pool_drops_tokens_without_grid_coordinates():
    # a 4 x 4 grid with a newline token after each row (grid_thw = -1)
    coords, media = [], []
    for h in range(4):
        coords += [(0, h, w) for w in range(4)] + [(-1, -1, -1)]
    media = [0] * len(coords)
    n = len(coords)
    layout = VisualLayout(
        media_index=torch.tensor(media),
        kind=torch.zeros(n, dtype=torch.long),
        frame=torch.zeros(n, dtype=torch.long),
        grid_thw=torch.tensor(coords),
        media_grid=[(1, 4, 4)],
    )
    feats = torch.randn(n, 2)
    result = PoolPrune().select(make_ctx(feats, layout, [4]))
    kept = result.keep_mask.nonzero().flatten()
    assert kept.numel() == 4
    assert (layout.grid_thw[kept] >= 0).all()
    grid_feats = feats[layout.grid_thw[:, 0] >= 0].reshape(2, 2, 2, 2, 2)
    torch.testing.assert_close(result.features, grid_feats.mean(dim=(1, 3)).reshape(4, 2))


def llava_next_like_layout() -> VisualLayout:
    """Base 4 x 4 grid at t=0, then a 6 x 8 crop grid at t=1 with a newline (-1) after each row."""
    coords = [(0, h, w) for h in range(4) for w in range(4)]
    for h in range(6):
        coords += [(1, h, w) for w in range(8)] + [(-1, -1, -1)]
    n = len(coords)
    return VisualLayout(
        media_index=torch.zeros(n, dtype=torch.long),
        kind=torch.zeros(n, dtype=torch.long),
        frame=torch.zeros(n, dtype=torch.long),
        grid_thw=torch.tensor(coords),
        media_grid=[(1, 4, 4)],
    )


def test_pool_llava_next_layout_exact_counts():
    layout = llava_next_like_layout()  # 16 + 48 grid tokens, 6 newlines
    feats = torch.randn(len(layout), 3, dtype=torch.float64)
    on_grid = layout.grid_thw[:, 0] >= 0
    for budget in range(1, len(layout) + 1):
        result = PoolPrune().select(make_ctx(feats, layout, [budget]))
        kept = result.keep_mask
        assert int(kept.sum()) == budget
        base = int(kept[:16].sum())
        if budget <= 64:
            assert not kept[~on_grid].any()
            assert base == budget * 16 // 64  # split in proportion to the grids' sizes
        else:
            assert kept[on_grid].all() and int(kept[~on_grid].sum()) == budget - 64
    # 35 = 8 base tokens (2 x 4 cells of the 4 x 4 grid) + 27 crop tokens
    result = PoolPrune().select(make_ctx(feats, layout, [35]))
    torch.testing.assert_close(result.features[:8], feats[:16].reshape(2, 2, 4, 1, 3).mean(dim=(1, 3)).reshape(8, 3))


def test_pool_incomplete_grid_fills_to_exact_budget_with_a_partition():
    full = grid_layout([(1, 8, 8)])
    present = torch.ones(64, dtype=torch.bool)
    present[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]] = False  # top-left 4 x 4 removed
    layout = full.select(present)
    feats = torch.randn(48, 2, dtype=torch.float64)
    for budget in (4, 5, 16, 30, 47):
        result = PoolPrune().select(make_ctx(feats, layout, [budget]))
        assert int(result.keep_mask.sum()) == budget == result.features.shape[0]
    # 2 x 2 cells of 4 x 4: the top-left one is empty, so the first largest cell (top-right) gives up
    # its token farthest from the centre (corners tie: the last, (3, 7)) as a cell of its own
    where = {tuple(c[1:].tolist()): i for i, c in enumerate(layout.grid_thw)}
    result = PoolPrune().select(make_ctx(feats, layout, [4]))
    kept = result.keep_mask.nonzero().flatten().tolist()
    assert kept == sorted([where[(1, 5)], where[(3, 7)], where[(5, 1)], where[(5, 5)]])
    top_right = [where[(h, w)] for h in range(4) for w in range(4, 8) if (h, w) != (3, 7)]
    expected = {
        where[(1, 5)]: feats[top_right].mean(0),
        where[(3, 7)]: feats[where[(3, 7)]],
        where[(5, 1)]: feats[[where[(h, w)] for h in range(4, 8) for w in range(4)]].mean(0),
        where[(5, 5)]: feats[[where[(h, w)] for h in range(4, 8) for w in range(4, 8)]].mean(0),
    }
    torch.testing.assert_close(result.features, torch.stack([expected[i] for i in kept]))


def test_pool_1d_fallback_without_any_grid():
    n = 10
    grid_thw = torch.full((n, 3), -1)
    feats = torch.arange(float(n)).unsqueeze(1)
    result = pool_grid(feats, grid_thw, None, 3)
    # chunks [0..3], [4..6], [7..9]; middle tokens 1, 5, 8
    assert result.keep_mask.nonzero().flatten().tolist() == [1, 5, 8]
    assert result.features.flatten().tolist() == [1.5, 5.0, 8.0]


# ----------------------------------------------------------------------------- fastv


def test_fastv_scores_with_head_mean_of_last_token_row():
    layout = grid_layout([(1, 2, 3)])
    feats = torch.randn(6, 4)
    text_before, text_after = 2, 3
    length = text_before + 6 + text_after
    heads = torch.rand(4, 1, length, generator=torch.Generator().manual_seed(0))
    heads = heads / heads.sum(-1, keepdim=True)
    calls = []

    def attention_fn(query_index: torch.Tensor) -> torch.Tensor:
        calls.append(query_index.tolist())
        return heads

    ctx = make_ctx(
        feats, layout, [3], layer=2, text_before=text_before, text_after=text_after, attention_fn=attention_fn
    )
    keep = FastV().select(ctx)
    assert calls == [[length - 1]]
    mean = heads[:, 0].mean(0)[text_before : text_before + 6]
    assert keep.nonzero().flatten().tolist() == sorted(mean.topk(3).indices.tolist())
    torch.testing.assert_close(last_token_attention_scores(heads, ctx.visual_index), mean)


def test_fastv_global_topk_and_contract():
    layout = grid_layout([(1, 1, 4), (1, 1, 4)])
    length = 8 + 3
    row = torch.zeros(2, 1, length)
    row[:, 0, :8] = torch.tensor([9.0, 8, 7, 6, 1, 2, 3, 4])
    ctx = make_ctx(torch.randn(8, 2), layout, [2, 2], layer=2, attention_fn=lambda q: row)
    assert FastV().select(ctx).nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert FastV(per_media=False).select(ctx).nonzero().flatten().tolist() == [0, 1, 2, 3]
    (stage,) = FastV().stages()
    assert stage.layer == 2 and stage.keep == 0.5 and stage.needs == frozenset({"attention"})
    with pytest.raises(MethodOptionError, match="layer must be >= 1"):
        FastV(layer=0)
    no_budget = make_ctx(torch.randn(8, 2), layout, None, layer=2, attention_fn=lambda q: row)
    for per_media in (True, False):
        with pytest.raises(BudgetError, match="needs a budget"):
            FastV(per_media=per_media).select(no_budget)
    no_attention = make_ctx(torch.randn(8, 2), layout, [2, 2], layer=2)
    with pytest.raises(PruneError):
        FastV().select(no_attention)


# ----------------------------------------------------------------------------- divprune


def brute_force_maxmin(features: torch.Tensor, k: int) -> list[int]:
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    dist = (1 - unit @ unit.T).tolist()
    n = len(dist)
    first = max(range(n), key=lambda i: min(dist[i][j] for j in range(n) if j != i))
    picked = [first]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: min(dist[i][j] for j in picked)))
    return picked


@pytest.mark.parametrize("seed", range(5))
def test_maxmin_diversity_matches_brute_force(seed):
    features = torch.randn(14, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in range(1, 15):
        expected = brute_force_maxmin(features, k)
        assert maxmin_diversity(features, k, host_loop=False).tolist() == expected
        assert maxmin_diversity(features, k, host_loop=True).tolist() == expected


def test_maxmin_diversity_duplicates_and_chunks():
    base = torch.randn(3, 4, dtype=torch.float64)
    features = base.repeat(3, 1)  # every token has two exact duplicates
    for host_loop in (False, True):
        picks = maxmin_diversity(features, 9, host_loop=host_loop)
        assert sorted(picks.tolist()) == list(range(9))
        assert sorted(picks[:3].remainder(3).tolist()) == [0, 1, 2]
    assert maxmin_diversity(features[:1], 1).tolist() == [0]
    assert maxmin_diversity(features, 0).numel() == 0


def test_divprune_select_per_media():
    layout = grid_layout([(1, 3, 4), (1, 2, 3)])
    feats = torch.randn(18, 5, dtype=torch.float64)
    mask = DivPrune(keep=None).select(make_ctx(feats, layout, [4, 2]))
    assert int(mask[:12].sum()) == 4 and int(mask[12:].sum()) == 2
    expected = torch.zeros(18, dtype=torch.bool)
    expected[brute_force_maxmin(feats[:12], 4)] = True
    expected[[12 + i for i in brute_force_maxmin(feats[12:], 2)]] = True
    assert torch.equal(mask, expected)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    names = available()
    for name in ("random", "pool", "fastv", "divprune", "zoo"):
        assert name in names and names[name] and "\n" not in names[name]
    assert isinstance(get_method("FastV", keep=0.3), FastV)
    assert get_method("fastv", keep=0.3).keep == 0.3
    with pytest.raises(UnknownMethodError) as info:
        get_method("fastvv")
    assert "fastv" in str(info.value) and "divprune" in str(info.value)
    with pytest.raises(TypeError, match="accepts"):
        get_method("fastv", bogus=1)
    assert parse_spec("pool + fastv") == ["pool", "fastv"]
    with pytest.raises(UnknownMethodError):
        parse_spec("pool+nope")
    with pytest.raises(UnknownMethodError):
        parse_spec("pool+")
    parts = get_methods("random+fastv", keep=0.4, per_media=False)
    assert [type(p) for p in parts] == [RandomPrune, FastV]
    assert parts[0].keep == 0.4 and parts[1].per_media is False
    with pytest.raises(ValueError):
        get_method("random+fastv")


def test_register_rejects_a_taken_name():
    class Other(Method):
        pass

    with pytest.raises(ValueError):
        register("fastv", Other, "clash")
    summary = available()["fastv"]
    register("fastv", FastV, summary)  # idempotent for the same class
    assert available()["fastv"] == summary


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_methods_on_cuda_match_cpu():
    layout = grid_layout([(1, 24, 24), (2, 12, 12)])
    feats = torch.randn(len(layout), 64, dtype=torch.float64)
    budgets = [64, 40]
    length = len(layout) + 3
    row = torch.rand(8, 1, length, dtype=torch.float64)
    for method in (RandomPrune(), PoolPrune(), DivPrune(), FastV()):
        results = []
        for device in ("cpu", "cuda"):
            attention = row.to(device)
            ctx = make_ctx(
                feats.to(device),
                layout,
                budgets,
                layer=method.layer,
                seed=5,
                attention_fn=lambda q, a=attention: a,
            )
            results.append(method.select(ctx))
        cpu, cuda = results
        assert mask_of(cuda).device.type == "cuda", method
        assert torch.equal(mask_of(cpu), mask_of(cuda).cpu()), method
        if isinstance(cpu, Selection):
            torch.testing.assert_close(cpu.features, cuda.features.cpu())

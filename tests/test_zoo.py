"""ZOO-Prune: zeroth-order sensitivity (trick vs naive vs analytic), the greedy selector, and the
method on hand-built SelectionContexts (no model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_prune.engine.context import IMAGE, SelectionContext, VisualLayout
from vlm_prune.errors import PruneError
from vlm_prune.methods.zoo import (
    ZOOPrune,
    gram_matrix,
    is_elementwise,
    minmax_normalise,
    sensitivity_diversity_greedy,
    unit_directions,
    zo_sensitivity,
    zo_sensitivity_moment,
    zo_sensitivity_naive,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(d_in: int, d_h: int, d_out: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_h), nn.GELU(), nn.Linear(d_h, d_out)).to(dtype)


# ----------------------------------------------------------------------------- sensitivity


def test_linear_projector_sensitivity_is_mean_norm_of_w_u():
    d_in, d_out, m = 8, 6, 16
    weight = torch.randn(d_out, d_in, generator=seeded(1), dtype=torch.float64)
    bias = torch.randn(d_out, generator=seeded(2), dtype=torch.float64)
    x = torch.randn(10, d_in, generator=seeded(3), dtype=torch.float64)
    scores = zo_sensitivity(
        x, weight, bias, nn.Identity(), num_directions=m, generator=seeded(4), compute_dtype=torch.float64
    )
    u = unit_directions(m, d_in, seeded(4)).double()
    expected = (u @ weight.T).norm(dim=1).mean()
    torch.testing.assert_close(scores, expected.expand(10), rtol=1e-9, atol=0)
    # the same holds in float32 with a callable tail, and for the naive version
    scores32 = zo_sensitivity(x.float(), weight.float(), bias.float(), lambda t: t, m, generator=seeded(4))
    torch.testing.assert_close(scores32.double(), expected.expand(10), rtol=1e-4, atol=0)
    naive = zo_sensitivity_naive(x.float(), lambda t: t @ weight.float().T + bias.float(), m, generator=seeded(4))
    torch.testing.assert_close(naive.double(), expected.expand(10), rtol=1e-4, atol=0)


@pytest.mark.parametrize("split_last_linear", [True, False])
def test_trick_equals_naive_on_gelu_mlp(split_last_linear):
    projector = mlp(12, 20, 16).double()
    x = torch.randn(30, 12, generator=seeded(5), dtype=torch.float64)
    first = projector[0]
    trick = zo_sensitivity(
        x,
        first.weight,
        first.bias,
        projector[1:],
        num_directions=24,
        generator=seeded(6),
        compute_dtype=torch.float64,
        split_last_linear=split_last_linear,
    )
    naive = zo_sensitivity_naive(x, projector, 24, generator=seeded(6), compute_dtype=torch.float64)
    torch.testing.assert_close(trick, naive, rtol=1e-8, atol=0)
    assert trick.std() > 0  # a nonlinear projector gives token-dependent scores
    # default float32 compute: still allclose
    trick32 = zo_sensitivity(
        x.float(),
        first.weight.float(),
        first.bias.float(),
        projector[1:].float(),
        24,
        generator=seeded(6),
        split_last_linear=split_last_linear,
    )
    torch.testing.assert_close(trick32.double(), naive, rtol=1e-3, atol=0)


def test_chunking_and_bf16_projector_are_handled():
    projector = mlp(10, 16, 8)
    x = torch.randn(7, 10, generator=seeded(7))
    kwargs = dict(num_directions=10, generator=None)
    whole = zo_sensitivity(
        x,
        projector[0].weight,
        projector[0].bias,
        projector[1:],
        chunk_rows=10**6,
        **{**kwargs, "generator": seeded(8)},
    )
    tiny = zo_sensitivity(
        x,
        projector[0].weight,
        projector[0].bias,
        projector[1:],
        chunk_rows=1,
        **{**kwargs, "generator": seeded(8)},
    )
    torch.testing.assert_close(whole, tiny)
    # a bf16 projector is scored in float32 (perturbations would round away in bf16)
    low = projector.to(torch.bfloat16)
    reference = zo_sensitivity_naive(x.bfloat16().float(), low.float(), 10, generator=seeded(9))
    for tail in (low[1:], nn.Sequential(nn.GELU(), nn.Sequential(low[2]))):
        got = zo_sensitivity(x.bfloat16(), low[0].weight, low[0].bias, tail, 10, generator=seeded(9))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    naive_low = zo_sensitivity_naive(x.bfloat16(), low, 10, generator=seeded(9))
    torch.testing.assert_close(naive_low, reference, rtol=1e-4, atol=1e-5)


def test_plain_callable_tail_over_bf16_layers_gets_a_clear_error():
    low = mlp(10, 16, 8).to(torch.bfloat16)
    x = torch.randn(5, 10).bfloat16()
    with pytest.raises(PruneError, match="nn.Module"):
        zo_sensitivity(x, low[0].weight, low[0].bias, lambda h: low[2](low[1](h)), 4, generator=seeded(0))


def test_minmax_normalise():
    torch.testing.assert_close(minmax_normalise(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(minmax_normalise(torch.full((4,), 3.0)), torch.ones(4))


# ----------------------------------------------------------------------------- greedy


def test_greedy_on_constructed_similarities():
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    near = torch.nn.functional.normalize(e0 + 0.1 * torch.tensor([0.0, 0.0, 1.0]), dim=0)  # cos(0,1) ~ .995
    z = torch.stack([e0, near, e1, -e0])
    scores = torch.tensor([1.0, 0.9, 0.5, 0.3])
    # gains after {0}: 1 -> .9*(1-.995), 2 -> .5*(1-0), 3 -> .3*(1-(-1)) = .6  => 3, then 2, then 1
    assert sensitivity_diversity_greedy(scores, z, 4).tolist() == [0, 3, 2, 1]
    assert sensitivity_diversity_greedy(scores, z, 2).tolist() == [0, 3]
    # a high score does not save a near-duplicate
    assert sensitivity_diversity_greedy(torch.tensor([1.0, 1.0, 0.2, 0.0]), z, 2).tolist() == [0, 2]
    assert sensitivity_diversity_greedy(scores, z, 0).numel() == 0


def brute_force_greedy(scores: torch.Tensor, z: torch.Tensor, k: int) -> list[int]:
    unit = torch.nn.functional.normalize(z.double(), dim=-1)
    cos = (unit @ unit.T).tolist()
    s = scores.double().tolist()
    picked = [max(range(len(s)), key=lambda i: s[i])]
    while len(picked) < k:
        rest = [i for i in range(len(s)) if i not in picked]
        picked.append(max(rest, key=lambda i: s[i] * (1 - max(cos[i][j] for j in picked))))
    return picked


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_brute_force(seed):
    z = torch.randn(20, 5, generator=seeded(seed), dtype=torch.float64)
    scores = torch.rand(20, generator=seeded(100 + seed), dtype=torch.float64)
    for k in (1, 5, 20):
        expected = brute_force_greedy(scores, z, k)
        assert sensitivity_diversity_greedy(scores, z, k, host_loop=False).tolist() == expected
        assert sensitivity_diversity_greedy(scores, z, k, host_loop=True).tolist() == expected


def test_greedy_exact_count_with_zero_gains():
    z = torch.ones(6, 3)  # all identical: every gain after the first pick is 0
    for host_loop in (False, True):
        picks = sensitivity_diversity_greedy(torch.zeros(6), z, 6, host_loop=host_loop)
        assert sorted(picks.tolist()) == list(range(6))


def test_low_precision_last_product_is_close():
    projector = mlp(32, 64, 48, seed=3).to(torch.bfloat16)
    x = torch.randn(40, 32, generator=seeded(13)).bfloat16()
    exact = zo_sensitivity(x, projector[0].weight, projector[0].bias, projector[1:], 16, generator=seeded(14))
    fast = zo_sensitivity(
        x,
        projector[0].weight,
        projector[0].bias,
        projector[1:],
        16,
        generator=seeded(14),
        product_dtype=torch.bfloat16,
    )
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=5e-3, atol=0)


# ----------------------------------------------------------------------------- the method


def zoo_ctx(seed: int = 0, with_first: bool = True, budgets: tuple[int, int] = (5, 3)) -> SelectionContext:
    projector = mlp(12, 24, 16, seed=11)
    n0, n1 = 16, 9
    n = n0 + n1
    x = torch.randn(n, 12, generator=seeded(12))
    with torch.no_grad():
        z = projector(x)
    layout = VisualLayout(
        media_index=torch.tensor([0] * n0 + [1] * n1),
        kind=torch.full((n,), IMAGE),
        frame=torch.zeros(n, dtype=torch.long),
        grid_thw=torch.tensor([(0, i // 4, i % 4) for i in range(n0)] + [(0, i // 3, i % 3) for i in range(n1)]),
        media_grid=[(1, 4, 4), (1, 3, 3)],
    )
    length = n + 4
    return SelectionContext(
        layer=0,
        num_visual=n,
        budget=sum(budgets),
        budget_per_media=list(budgets),
        visual_features=z,
        hidden_states=torch.cat([z, torch.zeros(4, 16)]),
        visual_index=torch.arange(n),
        input_ids=torch.zeros(length, dtype=torch.long),
        layout=layout,
        seed=seed,
        projector_inputs=x,
        projector=projector,
        projector_first=(projector[0].weight, projector[0].bias) if with_first else None,
        projector_tail=projector[1:] if with_first else None,
    )


def test_zoo_method_counts_determinism_and_fallback():
    method = ZOOPrune(keep=None, num_directions=16)
    mask = method.select(zoo_ctx(seed=3))
    assert mask.dtype == torch.bool and int(mask[:16].sum()) == 5 and int(mask[16:].sum()) == 3
    assert torch.equal(mask, method.select(zoo_ctx(seed=3)))
    # without the first-layer split the engine's full projector is used: same directions, and the same
    # choice as the exact estimator
    central = ZOOPrune(keep=None, num_directions=16, estimator="central")
    assert torch.equal(central.select(zoo_ctx(seed=3)), central.select(zoo_ctx(seed=3, with_first=False)))
    torch.testing.assert_close(
        method.sensitivity(zoo_ctx(seed=3, with_first=False)), central.sensitivity(zoo_ctx(seed=3)), rtol=1e-4, atol=0
    )
    # the choice is the greedy over per-item min-max normalised sensitivity
    ctx = zoo_ctx(seed=3)
    scores = method.sensitivity(ctx)
    expected = torch.zeros(25, dtype=torch.bool)
    expected[sensitivity_diversity_greedy(minmax_normalise(scores[:16]), ctx.visual_features[:16], 5)] = True
    expected[16 + sensitivity_diversity_greedy(minmax_normalise(scores[16:]), ctx.visual_features[16:], 3)] = True
    assert torch.equal(mask, expected)
    (stage,) = method.stages()
    assert stage.layer == 0 and stage.needs == frozenset({"projector"})


def test_zoo_method_keeps_everything_when_budget_covers_it_and_errors():
    assert ZOOPrune().select(zoo_ctx(budgets=(16, 99))).all()
    ctx = zoo_ctx()
    ctx.projector_inputs = None
    with pytest.raises(PruneError):
        ZOOPrune().select(ctx)
    ctx = zoo_ctx()
    ctx.projector_inputs = ctx.projector_inputs[:3]
    with pytest.raises(PruneError):
        ZOOPrune().select(ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zoo_on_cuda_matches_cpu():
    cpu = zoo_ctx(seed=2)
    cuda = zoo_ctx(seed=2)
    projector = cuda.projector.cuda()
    for name in ("visual_features", "hidden_states", "visual_index", "input_ids", "projector_inputs"):
        setattr(cuda, name, getattr(cuda, name).cuda())
    for name in ("media_index", "kind", "frame", "grid_thw"):
        setattr(cuda.layout, name, getattr(cuda.layout, name).cuda())
    cuda.projector, cuda.projector_tail = projector, projector[1:]
    cuda.projector_first = (projector[0].weight, projector[0].bias)
    method = ZOOPrune(num_directions=32)
    torch.testing.assert_close(method.sensitivity(cuda).cpu(), method.sensitivity(cpu), rtol=1e-4, atol=1e-5)
    assert torch.equal(method.select(cuda).cpu(), method.select(cpu))


def test_sketched_norm_tracks_the_exact_sensitivity():
    """The opt-in Johnson-Lindenstrauss sketch of the last layer keeps the ranking of the exact scores."""
    from torch import nn

    from vlm_prune.methods.zoo import zo_sensitivity

    torch.manual_seed(0)
    first = nn.Linear(32, 64)
    tail = nn.Sequential(nn.GELU(), nn.Linear(64, 512))
    x = torch.randn(200, 32) * torch.linspace(0.2, 3.0, 200).unsqueeze(1)
    exact = zo_sensitivity(x, first.weight, first.bias, tail, generator=torch.Generator().manual_seed(1))
    sketched = zo_sensitivity(
        x, first.weight, first.bias, tail, generator=torch.Generator().manual_seed(1), sketch_dim=256
    )

    def ranks(values):
        return torch.argsort(torch.argsort(values)).float()

    rho = torch.corrcoef(torch.stack([ranks(exact), ranks(sketched)]))[0, 1]
    assert rho > 0.95
    assert float(((sketched - exact).abs() / exact).median()) < 0.1


# ----------------------------------------------------------------------------- the moment estimator


def test_moment_estimator_through_a_linear_projector_is_rms_of_w_u():
    """With g = identity, S(i)² = mean_j ‖W2 W1 u_j‖² for every token (derived by hand)."""
    d_in, d_h, d_out, m = 6, 9, 5, 12
    w1 = torch.randn(d_h, d_in, generator=seeded(1), dtype=torch.float64)
    w2 = torch.randn(d_out, d_h, generator=seeded(2), dtype=torch.float64)
    x = torch.randn(7, d_in, generator=seeded(3), dtype=torch.float64)
    scores = zo_sensitivity_moment(
        x, w1, None, nn.Identity(), gram_matrix(w2, torch.float64), m, generator=seeded(4),
        compute_dtype=torch.float64,
    )  # fmt: skip
    u = unit_directions(m, d_in, seeded(4)).double()
    expected = (u @ w1.T @ w2.T).norm(dim=1).pow(2).mean().sqrt()
    torch.testing.assert_close(scores, expected.expand(7), rtol=1e-10, atol=0)


def test_moment_estimator_is_rms_of_brute_force_central_differences():
    """Against the definition: per token and direction, a central difference through the whole
    projector; the closed form equals the root of their mean square up to O(h²)."""
    projector = mlp(10, 24, 14, seed=3).double()
    x = torch.randn(20, 10, generator=seeded(5), dtype=torch.float64) * 2
    m, h = 16, 1e-4
    u = unit_directions(m, 10, seeded(6)).double()
    with torch.no_grad():
        deltas = torch.stack([(projector(x + h * uj) - projector(x - h * uj)) / (2 * h) for uj in u])  # (m, N, D)
        expected = deltas.norm(dim=-1).pow(2).mean(dim=0).sqrt()
    first, act, last = projector
    got = zo_sensitivity_moment(
        x, first.weight, first.bias, act, gram_matrix(last.weight, torch.float64), m, step=h,
        generator=seeded(6), compute_dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # and it is the RMS, not the mean: the exact estimator (mean of norms) is smaller, by Jensen
    exact = deltas.norm(dim=-1).mean(dim=0)
    assert bool((exact <= got * (1 + 1e-9)).all()) and not torch.allclose(exact, got, rtol=1e-3)


def test_elementwise_probe():
    assert is_elementwise(nn.GELU(), 16, torch.device("cpu"))
    assert is_elementwise(nn.Sequential(nn.SiLU()), 16, torch.device("cpu"))
    assert is_elementwise(nn.Identity(), 16, torch.device("cpu"))
    assert not is_elementwise(nn.LayerNorm(16), 16, torch.device("cpu"))
    assert not is_elementwise(nn.Softmax(dim=-1), 16, torch.device("cpu"))
    assert not is_elementwise(nn.Linear(16, 16), 16, torch.device("cpu"))
    assert not is_elementwise(nn.Linear(16, 8), 16, torch.device("cpu"))


def test_zoo_method_moment_vs_central_and_fallback():
    ctx = zoo_ctx(seed=1)
    moment, central = ZOOPrune(num_directions=16), ZOOPrune(num_directions=16, estimator="central")
    first, act, last = ctx.projector
    expected = zo_sensitivity_moment(
        ctx.projector_inputs, first.weight, first.bias, act, gram_matrix(last.weight), 16, generator=ctx.generator()
    )
    torch.testing.assert_close(moment.sensitivity(ctx), expected)
    # RMS >= mean, and the two rank the tokens alike
    m_scores, c_scores = moment.sensitivity(ctx), central.sensitivity(ctx)
    assert bool((c_scores <= m_scores * (1 + 1e-5)).all())
    assert float(torch.corrcoef(torch.stack([m_scores, c_scores]))[0, 1]) > 0.95
    # a tail that is not elementwise -> Linear falls back to the exact estimator
    ctx.projector_tail = nn.Sequential(nn.LayerNorm(24), last)
    ctx.projector = nn.Sequential(first, nn.LayerNorm(24), last)
    torch.testing.assert_close(moment.sensitivity(ctx), central.sensitivity(ctx))
    with pytest.raises(PruneError, match="estimator must be 'moment'"):
        ZOOPrune(estimator="mean")


def test_zoo_gram_cache_follows_in_place_weight_updates():
    ctx = zoo_ctx(seed=1)
    method = ZOOPrune(num_directions=16)
    before = method.sensitivity(ctx)
    (cached,) = method._gram_cache.values()
    # adapters build a new Sequential around the same modules per call: still one cached G
    ctx.projector_tail = nn.Sequential(*ctx.projector[1:])
    method.sensitivity(ctx)
    assert list(method._gram_cache.values()) == [cached]
    with torch.no_grad():
        ctx.projector[2].weight.mul_(2.0)  # S scales with W2
    torch.testing.assert_close(method.sensitivity(ctx), 2 * before)

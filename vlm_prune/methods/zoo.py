"""ZOO-Prune: zeroth-order sensitivity x diversity, pre-LLM (arXiv 2509.24837, CVPR 2026).

There is no official code; this follows METHODS.md. For the features X (N, d_in) entering the
multimodal projector M:

1. draw m directions u_j ~ N(0, I), normalised to unit norm (shared by all tokens, drawn from
   `ctx.generator()`, so a sample gets the same directions whatever the batch);
2. S(i) = mean_j || (M(x_i + h u_j) - M(x_i - h u_j)) / 2h ||_2  (defaults m = 64, h = 0.01),
   min-max normalised to Ŝ in [0, 1] per media item (all ones when S is constant);
3. greedy: P = {argmax Ŝ}, then add argmax_{i not in P} Ŝ(i)·(1 - max_{j in P} cos(z_i, z_j)) until
   |P| = k, where z are the projected tokens (`ctx.visual_features` at layer 0). Kept tokens stay
   in sequence order at their positions.

Cost (METHODS.md "cost trap"): the naive central difference runs 2·m·N projector rows. Even with the
tricks below, the exact estimator costs m·N·d_h·D multiply-adds (about 36 % of the prefill FLOPs of a
~100M-parameter model at 576 tokens, and 14 % on LLaVA-1.5-7B), so the default is a second-moment form
of the same quantity that costs N·d_h² (m times less):

* `estimator="moment"` (default). For M(x) = W2 g(W1 x + b1) + b2 with an elementwise activation g, the
  central difference along u_j is, to O(h²), δ_ij = W2 (g'(a_i) ⊙ v_j) with a_i = W1 x_i + b1 and
  v_j = W1 u_j. Its mean square over the same m directions has a closed form,
      mean_j ‖δ_ij‖² = g'(a_i)ᵀ (G ⊙ C) g'(a_i),   G = W2ᵀ W2,   C = (1/m) Σ_j v_j v_jᵀ,
  and S(i) is its square root. g'(a) is itself a central difference of the activation with step h,
  G is cached per weight tensor. Deviation: this is the root-mean-square of ‖δ_ij‖ (the paper takes the
  mean), in the h -> 0 limit. Measured on the embedded demo models (576 tokens, m = 64, same seed): Spearman
  0.976-0.998 with the exact estimator and 84-100 % of the same tokens kept at 64/128/192, which is closer
  than the exact estimator is to itself under another seed (Spearman 0.86-0.99, 79-94 %).
* `estimator="central"`: the paper's mean of norms of central differences, computed with the tricks
  below. Also used when the projector does not have the Linear -> elementwise -> Linear form.

The exact path uses the structure of the projector M(x) = tail(W1 x + b1):
* the first layer is linear, so W1(x ± h u) = W1 x ± h W1 u: W1 x is computed once and W1 u once
  per direction; only `tail` sees the perturbed batch;
* when `tail` ends in a linear layer (nn.Linear, or an nn.Sequential whose last module is one, as
  in LLaVA's GELU -> Linear), the central difference is taken *before* it: W2 (g(a+) - g(a-)) / 2h,
  which is exact algebra (the bias cancels) and halves the dominant matmul (one W2 product per
  direction instead of two);
* perturbed values are computed in float32 (`compute_dtype`): in bf16, x ± 0.01·u rounds back to x.
  An nn.Module tail with low-precision weights is run with float32 copies of its parameters
  (`torch.func.functional_call`); a plain callable tail is called with float32 input as is;
* directions are processed in chunks of at most `chunk_rows` perturbed rows to bound memory;
* `ZOOPrune` runs that last product in the layer's own dtype (bf16 on a bf16 model, on tensor
  cores): the subtraction already happened in float32, so only ~3 significant digits per element
  are lost, not the difference (`low_precision_product=False` keeps everything in float32). The
  whole path is also robust to TF32 matmuls; the naive one is not (see the benchmark);
* the greedy runs on the host (numpy) over one N x N cosine matrix when N <= 4096, because a device
  loop is bound by kernel launches (~0.1 ms per pick on an H200) and, on a CPU, by per-op dispatch
  (N=576, k=144, D=768, 1 thread: 7.5 ms on the host, 13 ms as a torch loop).
`zo_sensitivity_naive` is the plain central difference through the full projector, kept for tests
and for `benchmarks/zoo_overhead.py`. Measured on an H200 at the LLaVA-1.5 shape (N=576, 1024 ->
4096 -> 4096, m=64): 5.7 ms for the `ZOOPrune` path vs 65 ms naive, plus 1.2 ms of greedy for
k=128 (benchmarks/results/zoo_overhead.md).

For the fast paths the engine should hand over the tail as an nn.Module (e.g.
nn.Sequential(act, linear_2) for LLaVA's projector, `mlp[1:]` for a Qwen merger), not a lambda:
then it can be split before its last linear layer and run in float32.

Deviations / choices where the paper is silent:
* directions are shared across tokens (needed for the W1 u trick; the paper does not say);
* normalisation and selection are per media item with the engine's per-item budget;
* on Qwen-style mergers the engine passes the grouped (2x2-merged, post-LayerNorm) features as
  `projector_inputs`, so one score covers one merged token;
* if the engine gives no `projector_first`, the naive central difference through `ctx.projector`
  is used instead;
* the default `estimator="moment"` (root-mean-square, first order in h; see above);
* optional (`sketch_dim=r`, off by default, `estimator="central"` only): the output norm estimated through
  an r-dim Gaussian sketch of the last linear layer; its agreement with the exact ranking is tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm_prune.engine.context import SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError, PruneError
from vlm_prune.methods.base import Method
from vlm_prune.methods.registry import register

Tail = Callable[[torch.Tensor], torch.Tensor]


def unit_directions(
    num_directions: int,
    dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(m, dim) float32 random directions, u ~ N(0, I) normalised to unit norm.

    Drawn on the generator's device (CPU for `ctx.generator()`), then moved to `device`.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(num_directions, dim, generator=generator, dtype=torch.float32, device=draw_device)
    return F.normalize(u, dim=1).to(device if device is not None else draw_device)


def _in_dtype(fn: Tail, dtype: torch.dtype) -> Tail:
    """`fn` evaluated with floating parameters/buffers in `dtype` (nn.Module), or `fn` itself.

    A plain callable cannot be converted: if it fails on `dtype` input (e.g. a lambda around bf16
    layers), a PruneError says to pass the projector tail as an nn.Module.
    """
    if not isinstance(fn, nn.Module):

        def checked(x: torch.Tensor) -> torch.Tensor:
            try:
                return fn(x)
            except RuntimeError as error:
                if "dtype" not in str(error):
                    raise
                raise PruneError(
                    f"ZOO-Prune evaluates the projector in {dtype} (perturbations vanish in low precision), "
                    "but the projector tail is a plain callable over lower-precision layers; the adapter "
                    "should pass it as an nn.Module, e.g. nn.Sequential(projector.act, projector.linear_2)"
                ) from error

        return checked
    tensors = dict(fn.named_parameters())
    tensors.update(dict(fn.named_buffers()))
    if all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        return fn
    cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    return lambda x: torch.func.functional_call(fn, cast, (x,))


def _split_last_linear(tail: Tail) -> tuple[Tail, nn.Linear] | None:
    """(inner, last) with tail == last ∘ inner when `tail` ends in an nn.Linear, else None."""
    if isinstance(tail, nn.Linear):
        return nn.Identity(), tail
    if isinstance(tail, nn.Sequential) and len(tail) > 0 and isinstance(tail[-1], nn.Linear):
        return tail[:-1], tail[-1]
    return None


def _chunks(num_directions: int, num_tokens: int, chunk_rows: int) -> tuple[range, int]:
    """Direction chunks so that one tail call sees at most `chunk_rows` rows (at least 1 direction)."""
    per_chunk = max(1, chunk_rows // max(1, 2 * num_tokens))
    return range(0, num_directions, per_chunk), per_chunk


@torch.no_grad()
def zo_sensitivity(
    x: torch.Tensor,
    first_weight: torch.Tensor,
    first_bias: torch.Tensor | None,
    tail: Tail,
    num_directions: int = 64,
    step: float = 0.01,
    generator: torch.Generator | None = None,
    chunk_rows: int = 16384,
    compute_dtype: torch.dtype = torch.float32,
    split_last_linear: bool = True,
    product_dtype: torch.dtype | None = None,
    sketch_dim: int | None = None,
) -> torch.Tensor:
    """Zeroth-order sensitivity of a projector tail(x @ W1.T + b1) with the linear-first-layer trick.

    x: (N, d_in) projector inputs. first_weight: (d_h, d_in). first_bias: (d_h,) or None.
    tail: (R, d_h) -> (R, D), the rest of the projector.
    split_last_linear: take the difference before the tail's last nn.Linear when it has one.
    product_dtype: dtype of that last product, applied to the (already taken, already divided by
        2h) differences; None = `compute_dtype` (exact). bf16 keeps ~3 significant digits per
        element, with no cancellation (the subtraction happened in `compute_dtype`), and runs on
        tensor cores.
    sketch_dim: r, or None for the exact norm. With r, the tail's last linear W_L (D, d_h) is replaced by
        R W_L (r, d_h), R an (r, D) Gaussian matrix / sqrt(r) drawn from `generator` after the directions:
        ||R W_L v|| estimates ||W_L v|| without bias (Johnson-Lindenstrauss; relative error ~ 1/sqrt(2r) per
        vector, averaged over the m directions). The dominant product shrinks by D / r. Needs a tail that
        ends in nn.Linear; ignored otherwise.
    Returns S (N,) in `compute_dtype`: S(i) = mean_j ||(M(x_i + h u_j) - M(x_i - h u_j)) / 2h||,
    u_j from `unit_directions(num_directions, d_in, generator)` (the same draws as the naive version).
    """
    n = x.shape[0]
    device = x.device
    w1 = first_weight.to(device=device, dtype=compute_dtype)
    base = x.to(compute_dtype) @ w1.T  # (N, d_h): W1 x once
    if first_bias is not None:
        base = base + first_bias.to(device=device, dtype=compute_dtype)
    shifts = step * (unit_directions(num_directions, x.shape[1], generator, device).to(compute_dtype) @ w1.T)

    split = _split_last_linear(tail) if split_last_linear else None
    if split is not None:
        inner, last = _in_dtype(split[0], compute_dtype), split[1]
        w_last = last.weight.to(device=device, dtype=compute_dtype)
        if sketch_dim is not None and sketch_dim < w_last.shape[0]:
            sketch = torch.randn(sketch_dim, w_last.shape[0], generator=generator, dtype=torch.float32)
            w_last = (sketch.to(device=device, dtype=compute_dtype) / sketch_dim**0.5) @ w_last
        w_last = w_last.to(product_dtype or compute_dtype)
    else:
        full = _in_dtype(tail, compute_dtype)

    total = torch.zeros(n, dtype=compute_dtype, device=device)
    starts, per_chunk = _chunks(num_directions, n, chunk_rows)
    for start in starts:
        shift = shifts[start : start + per_chunk, None, :]  # (c, 1, d_h): h W1 u once per direction
        plus = rearrange(base + shift, "c n d -> (c n) d")
        minus = rearrange(base - shift, "c n d -> (c n) d")
        if split is not None:  # the bias of the last layer cancels
            difference = (inner(plus) - inner(minus)) * (0.5 / step)
            delta = difference.to(w_last.dtype) @ w_last.T
        else:
            out = full(torch.cat([plus, minus]))
            delta = (out[: plus.shape[0]] - out[plus.shape[0] :]) * (0.5 / step)
        norms = rearrange(delta.to(compute_dtype), "(c n) d -> c n d", n=n).norm(dim=-1)
        total += norms.sum(dim=0)
    return total / num_directions


@torch.no_grad()
def zo_sensitivity_naive(
    x: torch.Tensor,
    projector: Tail,
    num_directions: int = 64,
    step: float = 0.01,
    generator: torch.Generator | None = None,
    chunk_rows: int = 16384,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The plain central difference through the full projector (2·m·N projector rows).

    x: (N, d_in); projector: (R, d_in) -> (R, D). Returns S (N,), same definition and same random
    directions as `zo_sensitivity`.
    """
    n = x.shape[0]
    device = x.device
    xs = x.to(compute_dtype)
    shifts = step * unit_directions(num_directions, x.shape[1], generator, device).to(compute_dtype)
    run = _in_dtype(projector, compute_dtype)
    total = torch.zeros(n, dtype=compute_dtype, device=device)
    starts, per_chunk = _chunks(num_directions, n, chunk_rows)
    for start in starts:
        shift = shifts[start : start + per_chunk, None, :]
        plus = rearrange(xs + shift, "c n d -> (c n) d")
        minus = rearrange(xs - shift, "c n d -> (c n) d")
        out = run(torch.cat([plus, minus])).to(compute_dtype)
        delta = out[: plus.shape[0]] - out[plus.shape[0] :]
        total += rearrange(delta, "(c n) d -> c n d", n=n).norm(dim=-1).sum(dim=0)
    return total / (2.0 * step * num_directions)


def activation_slope(activation: Tail, pre_activation: torch.Tensor, step: float = 0.01) -> torch.Tensor:
    """g'(a) of an elementwise activation by a central difference with step h: (g(a+h) - g(a-h)) / 2h.

    pre_activation: (N, d_h). Returns (N, d_h) in its dtype (use float32: in bf16 a ± 0.01 rounds to a).
    """
    return (activation(pre_activation + step) - activation(pre_activation - step)) * (0.5 / step)


def is_elementwise(fn: Tail, dim: int, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `fn` acts on each coordinate alone, with the same function (probed, not proven).

    Checks, on a random (3, dim) probe, that permuting the coordinates commutes with `fn` and that
    moving one coordinate changes only that coordinate of the output. An activation passes; a
    LayerNorm, a softmax or a linear map does not.
    """
    probe = torch.randn(3, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    probe = probe.to(device=device, dtype=dtype)
    permutation = torch.randperm(dim, generator=torch.Generator().manual_seed(1)).to(device)
    try:
        out = fn(probe)
        if out.shape != probe.shape:
            return False
        permuted = fn(probe[:, permutation])
        moved = probe.clone()
        moved[:, 0] += 1.0
        others = fn(moved)[:, 1:]
    except (RuntimeError, TypeError, ValueError):
        return False
    return bool(torch.allclose(permuted, out[:, permutation]) and torch.allclose(others, out[:, 1:]))


def gram_matrix(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G = Wᵀ W, (d_h, d_h), for a linear layer's weight W (D, d_h)."""
    w = weight.to(dtype)
    return w.T @ w


@torch.no_grad()
def zo_sensitivity_moment(
    x: torch.Tensor,
    first_weight: torch.Tensor,
    first_bias: torch.Tensor | None,
    activation: Tail,
    last_gram: torch.Tensor,
    num_directions: int = 64,
    step: float = 0.01,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Root-mean-square sensitivity of W2 g(W1 x + b1) + b2 over m directions, in closed form.

    x: (N, d_in) projector inputs. first_weight: (d_h, d_in). first_bias: (d_h,) or None.
    activation: the elementwise g. last_gram: G = W2ᵀ W2, (d_h, d_h) (`gram_matrix`).
    Returns S (N,): S(i)² = mean_j ‖W2 (g'(a_i) ⊙ v_j)‖² = g'(a_i)ᵀ (G ⊙ C) g'(a_i) with
    v_j = W1 u_j, C = mean_j v_j v_jᵀ and u_j from `unit_directions(num_directions, d_in, generator)`
    (the draws of `zo_sensitivity`); that is the mean square of its central differences up to O(h²).
    Cost N·d_h² + m·d_h² multiply-adds instead of m·N·d_h·D.
    """
    device = x.device
    w1 = first_weight.to(device=device, dtype=compute_dtype)
    pre_activation = x.to(compute_dtype) @ w1.T  # (N, d_h)
    if first_bias is not None:
        pre_activation = pre_activation + first_bias.to(device=device, dtype=compute_dtype)
    slope = activation_slope(activation, pre_activation, step)  # (N, d_h)
    shifts = unit_directions(num_directions, x.shape[1], generator, device).to(compute_dtype) @ w1.T  # (m, d_h)
    direction_covariance = shifts.T @ shifts / num_directions  # C, (d_h, d_h)
    weighting = last_gram.to(device=device, dtype=compute_dtype) * direction_covariance  # G ⊙ C
    mean_square = ((slope @ weighting) * slope).sum(dim=-1)
    return mean_square.clamp_min(0).sqrt()


def minmax_normalise(scores: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N,) -> (N,) in [0, 1]; a constant vector (range <= eps·max|s|) maps to all ones."""
    low, high = scores.min(), scores.max()
    spread = high - low
    if float(spread) <= eps * max(float(scores.abs().max()), 1e-30):
        return torch.ones_like(scores)
    return (scores - low) / spread


def sensitivity_diversity_greedy(
    scores: torch.Tensor, z: torch.Tensor, k: int, host_loop: bool | None = None
) -> torch.Tensor:
    """ZOO-Prune's greedy selection.

    scores: (N,) normalised sensitivity Ŝ. z: (N, D) projected tokens. k: clamped to [0, N].
    Returns (k,) long indices in pick order: P = {argmax Ŝ}, then argmax_{i not in P}
    Ŝ(i)·(1 - max_{j in P} cos(z_i, z_j)) (ties -> lowest index).

    Two equivalent loops: on the tensors' device, updating the max-cos vector with one
    (N, D) x (D,) product per pick (O(N·k·D) time, O(N) memory); or on the host (`host_loop`), after
    one N x N cosine matrix on the device, with O(N) numpy work per pick. A device loop is bound by
    kernel launches (~0.1 ms per pick on a GPU) and a CPU torch loop by per-op dispatch, so
    `host_loop=None` picks the host loop for N <= 4096 and the device loop otherwise.
    """
    n = z.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    unit = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=-1)
    s = scores.to(device=z.device, dtype=unit.dtype)
    if host_loop is None:
        host_loop = n <= 4096
    if host_loop:
        return torch.from_numpy(_greedy_host(s.cpu().numpy(), (unit @ unit.T).cpu().numpy(), k)).to(z.device)
    picks = torch.empty(k, dtype=torch.long, device=z.device)
    first = torch.argmax(s)
    picks[0] = first
    max_cos = unit @ unit[first]
    taken = torch.zeros(n, dtype=torch.bool, device=z.device)
    taken[first] = True
    for step in range(1, k):
        gain = (s * (1.0 - max_cos)).masked_fill(taken, float("-inf"))
        pick = torch.argmax(gain)
        picks[step] = pick
        taken[pick] = True
        max_cos = torch.maximum(max_cos, unit @ unit[pick])
    return picks


def _greedy_host(s: np.ndarray, cos: np.ndarray, k: int) -> np.ndarray:
    """The greedy of `sensitivity_diversity_greedy` on a precomputed (N, N) cosine matrix."""
    picks = np.empty(k, dtype=np.int64)
    picks[0] = first = int(np.argmax(s))
    max_cos = cos[first].copy()
    penalty = np.zeros_like(s)
    penalty[first] = -np.inf
    for step in range(1, k):
        pick = int(np.argmax(s * (1.0 - max_cos) + penalty))
        picks[step] = pick
        penalty[pick] = -np.inf
        np.maximum(max_cos, cos[pick], out=max_cos)
    return picks


@dataclass
class ZOOPrune(Method):
    """ZOO-Prune: zeroth-order projector sensitivity x cosine diversity, pre-LLM.

    keep: fraction in (0, 1] or count per media item (None: set by `apply()`; the paper reports
        64 / 128 / 192 of LLaVA-1.5's 576 tokens).
    estimator: "moment" (default: the root-mean-square of the central differences in closed form,
        N·d_h² work; see the module docstring for the deviation and its measured agreement) or
        "central" (the paper's mean of norms, m·N·d_h·D work). "moment" needs a projector of the
        form Linear -> elementwise activation -> Linear and falls back to "central" otherwise.
    num_directions: m, random directions (default 64).
    step: h, the finite-difference step (default 0.01).
    chunk_rows: at most this many perturbed rows per projector-tail call (memory bound).
    low_precision_product: run the projector's last linear layer on the (fp32) differences in that
        layer's own dtype (bf16 on a bf16 model: tensor cores, ~1e-3 relative error per element, no
        cancellation); False = all in float32. No effect on float32 models.
    sketch_dim: None (default, the paper's exact norm) or r for a Johnson-Lindenstrauss estimate of the
        output norm (see `zo_sensitivity`), an opt-in deviation that divides the dominant product by D / r.
        Measured on the ~100M bench LLaVA on 1 CPU thread (N=576, m=64): selection 1355 ms exact, 650 ms
        with r=128 (Spearman 0.93 with the exact ranking); the rest is elementwise work on the 2*m*N
        perturbed rows.
    """

    keep: float | int | None = None
    estimator: Literal["moment", "central"] = "moment"
    num_directions: int = 64
    step: float = 0.01
    chunk_rows: int = 16384
    low_precision_product: bool = True
    sketch_dim: int | None = None
    _gram_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    layer = 0
    needs = frozenset({"projector"})
    name = "zoo"

    def __post_init__(self) -> None:
        if self.estimator not in ("moment", "central"):
            raise MethodOptionError(
                f"ZOO-Prune estimator must be 'moment' (closed form, the default) or 'central' (the paper's "
                f"mean of norms), got {self.estimator!r}"
            )

    def _moment_parts(self, tail: Tail, device: torch.device) -> tuple[Tail, torch.Tensor] | None:
        """(activation in float32, G = W2ᵀ W2) when the tail is elementwise -> Linear, else None.

        G and the elementwise probe are cached per weight tensor (and its in-place version counter).
        """
        split = _split_last_linear(tail)
        if split is None:
            return None
        inner, last = split
        # adapters may build a new Sequential around the same modules per call: key on the modules
        if isinstance(inner, nn.Identity):  # a bare Linear tail: `_split_last_linear` makes a new Identity
            parts: tuple = ("identity",)
        else:
            parts = tuple(map(id, inner.children())) if isinstance(inner, nn.Sequential) else (id(inner),)
        key = (id(last.weight), last.weight._version, parts, device)
        if key not in self._gram_cache:
            activation = _in_dtype(inner, torch.float32)
            elementwise = is_elementwise(activation, last.weight.shape[1], device)
            gram = gram_matrix(last.weight.detach().to(device), torch.float32) if elementwise else None
            self._gram_cache.clear()  # one projector per wrapped model; keep only the latest
            self._gram_cache[key] = (activation, gram) if elementwise else None
        return self._gram_cache[key]

    def sensitivity(self, ctx: SelectionContext) -> torch.Tensor:
        """(N,) raw sensitivity S of all the sample's visual tokens (one draw of directions)."""
        x = ctx.projector_inputs
        split_ok = ctx.projector_first is not None and ctx.projector_tail is not None
        if x is None or not (split_ok or ctx.projector is not None):
            raise PruneError(
                "ZOO-Prune needs the projector inputs and the projector; declare needs={'projector'} "
                "and use a model whose adapter exposes its multimodal projector"
            )
        if x.shape[0] != ctx.num_visual:
            raise PruneError(
                f"ZOO-Prune got {x.shape[0]} projector inputs for {ctx.num_visual} visual tokens; the "
                "adapter must pass one projector input row per visual token (grouped for mergers)"
            )
        options = dict(
            num_directions=self.num_directions,
            step=self.step,
            generator=ctx.generator(),
            chunk_rows=self.chunk_rows,
        )
        if split_ok:
            assert ctx.projector_first is not None and ctx.projector_tail is not None
            weight, bias = ctx.projector_first
            moment = self._moment_parts(ctx.projector_tail, x.device) if self.estimator == "moment" else None
            if moment is not None:
                options.pop("chunk_rows")
                return zo_sensitivity_moment(x, weight, bias, moment[0], moment[1], **options)
            split = _split_last_linear(ctx.projector_tail)
            if self.low_precision_product and split is not None:
                options["product_dtype"] = split[1].weight.dtype
            return zo_sensitivity(x, weight, bias, ctx.projector_tail, sketch_dim=self.sketch_dim, **options)
        assert ctx.projector is not None
        return zo_sensitivity_naive(x, ctx.projector, **options)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.budget_per_media is None:
            raise BudgetError("ZOO-Prune needs a budget: pass keep=... to apply()")
        device = ctx.visual_features.device
        keep_mask = torch.zeros(ctx.num_visual, dtype=torch.bool, device=device)
        items = [
            ((ctx.layout.media_index == item).nonzero(as_tuple=True)[0], budget)
            for item, budget in enumerate(ctx.budget_per_media)
        ]
        items = [(members, budget) for members, budget in items if members.numel() > 0]
        if all(budget >= members.numel() for members, budget in items):
            for members, _ in items:  # nothing to prune: skip the sensitivity pass
                keep_mask[members] = True
            return keep_mask
        scores = self.sensitivity(ctx).to(device)
        for members, budget in items:
            normalised = minmax_normalise(scores[members])
            picks = sensitivity_diversity_greedy(normalised, ctx.visual_features[members], budget)
            keep_mask[members[picks]] = True
        return keep_mask


register(
    "zoo",
    ZOOPrune,
    "ZOO-Prune (2509.24837): zeroth-order projector sensitivity x cosine diversity, greedy, pre-LLM.",
)

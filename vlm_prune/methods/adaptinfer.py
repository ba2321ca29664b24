"""AdaptInfer: text-guided visual-token pruning with dynamic text priors (arXiv 2508.06084).

Where: in the LLM, several stages; each prunes on the INPUT of decoder layer k using the attention
of layer k-1 (the authors prune at the OUTPUT of layer k-1, which is the same thing).

Algorithm, per stage and per sample (`adaptinfer_scores`):
1. A = attention of layer k-1 for the text queries after the media (T = `ctx.text_index`), heads
   kept separate: (H, T, L). Only these T rows are recomputed from q/k (`ctx.attention_rows`), which
   is flash/sdpa-compatible; the authors materialise the full (H, L, L) matrix with eager attention.
2. A_tt = A[:, :, T]; S = A_tt + A_ttᵀ − diag(A_tt); the text prior w_h(t) = row sums of S (what a
   text token gives plus receives; S is symmetric, so row and column sums agree).
3. score(v) = Σ_h Σ_t w_h(t) · A_h(t, v): heads summed, not averaged.
4. Keep the top-k visual tokens per media item in their original order (ties: earlier token).

Schedules (`Schedule`: input layer of each stage and the budget after it):
- LLaVA-1.5-7B (authors' `sparse_token_dict`, pruning at the output of layers [1, 10, 20] = input of
  [2, 11, 21]): "128" keeps 290 / 72 / 18 of 576 tokens, "64" keeps 133 / 27 / 3, "48" keeps
  80 / 24 / 2. LLaVA-1.5-13B (40 layers, same layers): "128" 300 / 94 / 30, "64" 148 / 40 / 5. These are
  int counts per media item, so the kept counts equal the authors' exactly. (Their "32" preset keeps
  0 tokens in the last stage; it is not offered.)
- Qwen2-VL (output of [0, 9, 19] = input of [1, 10, 20]), per-stage keep ratios: 10 % -> [0.17, 0.6, 0.3],
  30 % -> [0.5, 0.6, 0.3], 50 % -> [0.7, 0.9, 0.3]. Our `Stage.keep` is the cumulative product (a
  fraction of the ORIGINAL tokens), which the engine turns into a count per media item. Deviation: the
  authors take int(ratio * current count) stage by stage (chained floors, and at most N-1); the engine's
  rounding of the cumulative fraction can differ from that by a token or two.
- Budget labels are "equivalent average tokens over layers" (`equivalent_average_tokens`). The
  authors' labels count the layer whose output is pruned as already pruned (LLaVA "128" -> 128.8,
  Qwen2-VL "10 %" -> 10.1 %); with our honest accounting (layer k-1 still sees every token) the same
  schedules average 146.25 and 82.9 tokens for "128" and "64". Pass `authors_convention=True` to get
  their numbers.

`keep` for this method means the equivalent average budget, as in the paper. How `bind()` (or
`stages()`) turns it into a schedule, first match wins:
1. explicit `schedule=`, or `layers=` + per-stage `ratios=`;
2. `preset=` by name (`PRESETS`) or a path to a JSON preset written by `methods.calibration.save_preset`;
3. the bound model is LLaVA-1.5-7B/13B and `keep` is 128/64/48 tokens (int, or a fraction within half a
   token of it at 576 tokens), or Qwen2-VL (28 layers) and `keep` is 0.1/0.3/0.5: the authors' preset;
   an embedded demo model and a budget it ships a calibrated preset for (`calibration.demo_preset`);
4. otherwise the documented rule `derive_schedule`: stages on the input of layers
   round(L·[1/16, 1/3, 2/3]) (at least 1, strictly increasing, below L: [2, 11, 21] for L = 32), and one
   geometric per-stage ratio r (cumulative keeps r, r², r³) solved by bisection so that the equivalent
   average tokens (our accounting) equal keep·N. When keep·L is below the first stage layer, the first
   stage moves to layer 1; below 1/L it is unreachable and raises `BudgetError`. An int `keep` without a
   preset raises `BudgetError` (the rule needs a fraction). For models without a preset, the calibration
   tool (`methods.calibration`, `vlm-prune calibrate`) proposes layers from where cross-modal attention
   shifts.

Other deviations: batch > 1 and padding are supported (the reference code is batch-1 only); positions
follow the engine's policy (the reference renumbers contiguously); the unused SparseVLM-style token
recycling/merging path of the reference code (disabled there by `s_flag = 0`) is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_prune.engine.context import SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.base import Method, Stage, topk_mask_per_media
from vlm_prune.methods.registry import register

# ---------------------------------------------------------------------------------------------------
# Pure scoring functions


def text_prior_weights(a_tt: torch.Tensor) -> torch.Tensor:
    """Per-head text prior: a_tt (H, T, T) text-to-text attention -> w (H, T).

    S = A + Aᵀ − diag(A) (the diagonal counted once); w_h(t) = Σ_t' S_h(t, t').
    """
    diag = torch.diagonal(a_tt, dim1=-2, dim2=-1)
    sym = a_tt + a_tt.transpose(-1, -2) - torch.diag_embed(diag)
    return sym.sum(dim=-1)


def adaptinfer_scores(rows: torch.Tensor, text_pos: torch.Tensor, visual_pos: torch.Tensor) -> torch.Tensor:
    """AdaptInfer visual-token scores.

    rows: (H, T, L) attention probabilities of the T text queries over the sequence.
    text_pos: (T,) sequence positions of those text queries (the columns of A_tt).
    visual_pos: (N,) sequence positions of the visual tokens.
    Returns (N,) float32: s(v) = Σ_h Σ_t w_h(t) · A_h(t, v).
    """
    rows = rows.float()
    weights = text_prior_weights(rows[:, :, text_pos])  # (H, T)
    return torch.einsum("ht,htn->n", weights, rows[:, :, visual_pos])


# ---------------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class Schedule:
    """Where the stages run and what each keeps.

    layers: input decoder layer of each stage (strictly increasing, >= 1).
    keep: budget AFTER each stage: a fraction of the original visual tokens of each media item (float)
        or a count per media item (int); non-increasing.
    source: where it came from (preset name, "derived", "calibrated", ...).
    """

    layers: tuple[int, ...]
    keep: tuple[float | int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.keep) or not self.layers:
            raise MethodOptionError(f"a schedule needs as many layers as keeps, at least one: {self}")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 1:
            raise MethodOptionError(f"schedule layers must be strictly increasing and >= 1, got {self.layers}")

    def counts(self, n: int) -> list[int]:
        """Tokens kept after each stage for a media item of n tokens, with the engine's rounding of a
        fraction (half up, at least 1; see `engine.budget.tokens_to_keep`)."""
        return [min(n, int(k)) if isinstance(k, int) else min(n, max(1, math.floor(k * n + 0.5))) for k in self.keep]

    def ratios(self, n: int | None = None) -> list[float]:
        """Per-stage keep ratios (kept after / kept before the stage); int keeps need n."""
        if n is None and any(isinstance(k, int) for k in self.keep):
            raise BudgetError("per-stage ratios of a count schedule need n, the media item's token count")
        fractions = [k / n if isinstance(k, int) and n else float(k) for k in self.keep]
        previous = [1.0, *fractions[:-1]]
        return [f / p if p > 0 else 0.0 for f, p in zip(fractions, previous)]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "keep": list(self.keep), "source": self.source}


def cumulative(ratios: Sequence[float]) -> tuple[float, ...]:
    """Per-stage ratios -> cumulative fractions of the original tokens (running product)."""
    out, acc = [], 1.0
    for r in ratios:
        acc *= float(r)
        out.append(acc)
    return tuple(out)


def equivalent_average_tokens(
    schedule: Schedule, num_layers: int, n: int, *, authors_convention: bool = False
) -> float:
    """Visual tokens per decoder layer, averaged over the `num_layers` layers.

    Ours (default): layers [0, k_1) see n tokens, [k_i, k_{i+1}) see T_i, [k_S, L) see T_S:
        (k_1 · n + Σ_i (k_{i+1} − k_i) · T_i) / L.
    `authors_convention=True` counts the layer whose output is pruned (k_i − 1) as already pruned,
    which is how AdaptInfer's budget labels are computed (LLaVA "128" preset -> 128.8).
    T_i are exact fractions · n for float keeps (no rounding).
    """
    tokens = [float(k) if isinstance(k, int) else float(k) * n for k in schedule.keep]
    starts = [k - 1 if authors_convention else k for k in schedule.layers]
    bounds = [*starts[1:], num_layers]
    total = starts[0] * n + sum((b - a) * t for a, b, t in zip(starts, bounds, tokens))
    return total / num_layers


DEPTH_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 3, 2 / 3)


def default_layers(num_layers: int, fractions: Sequence[float] = DEPTH_FRACTIONS) -> tuple[int, ...]:
    """Stage layers for an L-layer model: round-half-up(f·L), at least 1, strictly increasing, below L."""
    layers: list[int] = []
    for f in fractions:
        k = max(layers[-1] + 1 if layers else 1, int(math.floor(f * num_layers + 0.5)))
        if k >= num_layers:
            break
        layers.append(k)
    if not layers:
        raise BudgetError(f"AdaptInfer needs at least 2 decoder layers, the model has {num_layers}")
    return tuple(layers)


def solve_geometric_ratio(layers: Sequence[int], num_layers: int, keep: float) -> float:
    """The per-stage ratio r with equivalent_average_tokens(layers, r, r², ...) == keep · n (bisection)."""

    def equivalent(r: float) -> float:
        sched = Schedule(tuple(layers), tuple(r ** (i + 1) for i in range(len(layers))))
        return equivalent_average_tokens(sched, num_layers, 1)

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if equivalent(mid) < keep:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def derive_schedule(keep: float, num_layers: int, fractions: Sequence[float] = DEPTH_FRACTIONS) -> Schedule:
    """The documented rule for models without a preset (see the module docstring)."""
    if not 0 < keep <= 1:
        raise BudgetError(f"AdaptInfer keep must be a fraction in (0, 1] to derive a schedule, got {keep!r}")
    layers = list(default_layers(num_layers, fractions))
    if keep * num_layers <= layers[0]:
        if keep * num_layers <= 1:
            raise BudgetError(
                f"AdaptInfer cannot average keep={keep} over {num_layers} layers: decoder layer 0 always sees "
                f"every visual token, so the minimum is above 1/{num_layers}; use a pre-LLM method or a larger keep"
            )
        layers = [1, *[k for k in layers if k > 1]]
    if keep >= 1:
        return Schedule(tuple(layers), tuple(1.0 for _ in layers), "derived")
    ratio = solve_geometric_ratio(layers, num_layers, keep)
    return Schedule(tuple(layers), cumulative([ratio] * len(layers)), "derived")


def _llava(counts: tuple[int, int, int], label: int, size: str) -> tuple[str, Schedule]:
    name = f"llava-1.5-{size}/{label}"
    return name, Schedule((2, 11, 21), counts, name)


#: Per-stage ratios of the Qwen2-VL presets, as the authors wrote them (label = nominal keep %).
QWEN2_VL_RATIOS: dict[int, tuple[float, float, float]] = {
    10: (0.17, 0.6, 0.3),
    30: (0.5, 0.6, 0.3),
    50: (0.7, 0.9, 0.3),
}

#: The authors' published schedules (AdaptInfer-base `score.py`).
PRESETS: dict[str, Schedule] = dict(
    [
        _llava((290, 72, 18), 128, "7b"),
        _llava((133, 27, 3), 64, "7b"),
        _llava((80, 24, 2), 48, "7b"),
        _llava((300, 94, 30), 128, "13b"),
        _llava((148, 40, 5), 64, "13b"),
    ]
    + [
        (f"qwen2-vl/{label}", Schedule((1, 10, 20), cumulative(ratios), f"qwen2-vl/{label}"))
        for label, ratios in QWEN2_VL_RATIOS.items()
    ]
)

LLAVA_TOKENS = 576


def match_preset(info: Any, keep: float | int | None) -> str | None:
    """The preset name for a bound model (`.family`, `.num_layers`, `.name_or_path`) and keep, or None."""
    if info is None or keep is None:
        return None
    family = str(getattr(info, "family", "") or "").lower().replace("-", "_")
    name = str(getattr(info, "name_or_path", "") or "").lower()
    num_layers = getattr(info, "num_layers", None)
    if family == "llava" and num_layers in (32, 40):
        size = "7b" if num_layers == 32 else "13b"
        if name and not any(tag in name for tag in ("1.5", "1_5", "v15", "-15-")):
            return None
        tokens = keep if isinstance(keep, int) else keep * LLAVA_TOKENS
        for label in (128, 64, 48):
            if abs(tokens - label) < 0.5 and f"llava-1.5-{size}/{label}" in PRESETS:
                return f"llava-1.5-{size}/{label}"
        return None
    if family == "qwen2_vl" and num_layers == 28 and isinstance(keep, float):
        for label in (10, 30, 50):
            if abs(keep - label / 100) < 1e-6:
                return f"qwen2-vl/{label}"
    return None


# ---------------------------------------------------------------------------------------------------
# The method


def schedule_stages(
    schedule: Schedule, num_layers: int | None, select: Any, needs: Any, title: str, prefix: str
) -> list[Stage]:
    """One in-LLM Stage per schedule layer (`prefix@k`), after checking the layers fit a `num_layers` decoder.

    Shared by the staged methods (AdaptInfer, AdaToken-3D); `title` names the method in the error.
    """
    if num_layers is not None and schedule.layers[-1] >= num_layers:
        raise BudgetError(
            f"{title} schedule layers {list(schedule.layers)} do not fit a {num_layers}-layer model; "
            "pass layers=... or a preset made for it"
        )
    return [
        Stage(layer=k, select=select, keep=keep, needs=frozenset(needs), name=f"{prefix}@{k}")
        for k, keep in zip(schedule.layers, schedule.keep)
    ]


@dataclass(repr=True)
class AdaptInfer(Method):
    """AdaptInfer (arXiv 2508.06084): text-prior-weighted text->visual attention, several in-LLM stages.

    keep: equivalent average visual tokens over layers (fraction in (0, 1], or a token count that
        matches a preset); None = set by `apply()`.
    preset: a `PRESETS` name ("llava-1.5-7b/128", "qwen2-vl/10", ...) or a JSON preset path.
    num_layers: decoder depth, for deriving a schedule before/without `bind()`.
    layers, ratios: an explicit schedule: input layer of each stage and per-stage keep ratios
        (cumulative product = kept fraction of the original tokens).
    schedule: an explicit `Schedule` (wins over everything else).
    """

    keep: float | int | None = None
    preset: str | None = None
    num_layers: int | None = None
    layers: Sequence[int] | None = None
    ratios: Sequence[float] | None = None
    schedule: Schedule | None = None
    _info: Any = field(default=None, init=False, repr=False, compare=False)

    name = "adaptinfer"
    needs = frozenset({"attention"})
    layer = 1

    def bind(self, info: Any) -> AdaptInfer:
        """Remember the model (`.num_layers`, `.family`, `.name_or_path`); `stages()` then picks a preset
        or derives the schedule from its depth."""
        self._info = info
        return self

    def resolve_schedule(self) -> Schedule:
        """The schedule `stages()` will use (see the module docstring for the order of rules)."""
        if self.schedule is not None:
            return self.schedule
        if self.layers is not None or self.ratios is not None:
            if self.layers is None or self.ratios is None or len(self.layers) != len(self.ratios):
                raise BudgetError("AdaptInfer: pass both layers=[...] and per-stage ratios=[...] of equal length")
            return Schedule(tuple(int(k) for k in self.layers), cumulative(self.ratios), "explicit")
        if self.preset is not None:
            if self.preset in PRESETS:
                return PRESETS[self.preset]
            if self.preset.endswith(".json"):
                from vlm_prune.methods.calibration import load_preset

                return load_preset(self.preset)
            raise BudgetError(f"unknown AdaptInfer preset {self.preset!r}; known: {', '.join(PRESETS)} or a .json path")
        matched = match_preset(self._info, self.keep)
        if matched is not None:
            return PRESETS[matched]
        from vlm_prune.methods.calibration import demo_preset, load_preset

        shipped = demo_preset(self._info, self.keep)  # the embedded demo models' calibrated presets
        if shipped is not None:
            return load_preset(shipped)
        if self.keep is None:
            raise BudgetError("AdaptInfer needs a budget: pass keep=... (equivalent average fraction) or a preset")
        if isinstance(self.keep, int) and not isinstance(self.keep, bool):
            raise BudgetError(
                f"AdaptInfer keep={self.keep} is a token count with no matching preset for this model; "
                "pass keep as a fraction in (0, 1] (equivalent average tokens over layers)"
            )
        num_layers = self.num_layers or getattr(self._info, "num_layers", None)
        if not num_layers:
            raise BudgetError(
                "AdaptInfer needs the decoder depth to derive a schedule: pass num_layers=..., or let apply() bind "
                "the model"
            )
        return derive_schedule(float(self.keep), int(num_layers))

    def stages(self) -> list[Stage]:
        num_layers = self.num_layers or getattr(self._info, "num_layers", None)
        return schedule_stages(self.resolve_schedule(), num_layers, self.select, self.needs, "AdaptInfer", "adaptinfer")

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        """(N,) AdaptInfer scores of this sample's visual tokens at this stage."""
        text_index = ctx.text_index
        if text_index.numel() == 0:
            return torch.zeros(ctx.num_visual, device=ctx.hidden_states.device)
        rows = ctx.attention_rows(text_index)  # (H, T, L)
        return adaptinfer_scores(rows, text_index.to(rows.device), ctx.visual_index.to(rows.device))

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.budget_per_media is None:
            raise BudgetError("AdaptInfer needs a budget: pass keep=... to apply()")
        scores = self.score(ctx).to(ctx.layout.media_index.device)
        return topk_mask_per_media(scores, ctx.layout.media_index, ctx.budget_per_media)


register(
    "adaptinfer",
    AdaptInfer,
    "AdaptInfer (arXiv 2508.06084): text-prior-weighted text->visual attention, pruned in several in-LLM stages.",
)

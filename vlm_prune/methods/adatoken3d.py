"""AdaToken-3D: staged spatial-token gating for 3-D LMMs (arXiv 2505.12782), on LLaVA-3D and any other family.

The paper mines attention patterns to measure each spatial token's information flow and tailors a pruning
schedule per architecture; its exact gating formula is not public. Its released code does PyramidDrop-style
staged dropping, which is what this module implements:

1. On the input of decoder layers [8, 16, 24] of a 32-layer LLM, the next layer's query and keys are
   recomputed (input layernorm, q/k projections, RoPE) for the LAST instruction token only (the last prompt
   token at prefill), and its attention over the sequence is averaged over heads (`last_token_scores`).
2. The spatial tokens (every visual token of each media item: a LLaVA-3D scene's voxel tokens, or an image's
   patches on the image families) are ranked by that attention and the top share is kept, in the original
   order (`topk_mask_per_media`).
3. Keep ratios [1, 0.5, 0.25, 0.125]: layers [0, 8) see every spatial token, [8, 16) half, [16, 24) a
   quarter, [24, 32) an eighth. These are fractions of the ORIGINAL spatial tokens (cumulative).

Defaults and how the schedule is chosen (`AdaToken3D.resolve_schedule`, first match wins):
1. an explicit `schedule=`, or `layers=` with the authors' style `ratios=` (cumulative, one more than the
   layers and starting at 1.0, e.g. [1, 0.5, 0.25, 0.125]; or one per layer without the leading 1.0);
2. `preset=`: "authors" (the schedule above, scaled to depth) or the path of a JSON preset written by the
   calibration (`vlm-prune calibrate --method adatoken3d`; `save_preset` / `load_preset` below);
3. the bound model is an embedded demo model that ships a calibrated preset (`adatoken3d_presets/`) for this
   `keep` (its equivalent average budget within 1e-3);
4. `keep=None`: the authors' schedule, with its layers scaled to the model's depth:
   round-half-up(L · [1/4, 1/2, 3/4]) (at least 1, strictly increasing, below L: [2, 4, 6] for L = 8,
   [3, 6, 9] for 12);
5. `keep` a fraction: the same layers and one geometric per-stage ratio r (cumulative r, r², r³) solved so that
   the equivalent average spatial tokens over layers equal keep · N (`adaptinfer.solve_geometric_ratio`, the
   accounting of `adaptinfer.equivalent_average_tokens`). The authors' schedule is the case r = 0.5, i.e.
   keep = 15/32 = 0.469. An int `keep` raises `BudgetError` (pass a fraction).

Tailoring ("attention pattern mining") as an offline calibration, ours (pure functions here; the model run is
`vlm_prune.calibrate_runner.calibrate_adatoken3d`):
- `spatial_share`: per layer, the share of the last instruction token's head-averaged attention that flows into
  spatial tokens;
- `low_contribution_fraction`: per layer, the largest fraction of spatial tokens (least attended first) that
  together carry under `mass` (5 %) of that spatial attention. The paper reports over 60 % of spatial tokens
  under 5 %;
- `propose_schedule`: layer l needs r_l = 1 − f_l of the tokens (f_l its low-contribution fraction) when its
  spatial share is at least `min_share`, else only `min_keep`; a stage on the input of layer k must keep
  max_{l >= k} r_l (every later layer must still find its tokens); the `n_stages` stage layers (>= 1) are the
  ones that minimise the equivalent average tokens (exhaustive search over the layer combinations).

Deviations from the released code:
- per-stage counts are the engine's rounding of the cumulative fraction (half up, at least 1 token per media
  item; `engine.budget`), the authors take int(N · ratio);
- batch > 1 with padding and several media items are supported (top-k per media item); the authors run batch 1;
- positions follow the engine's policy (default "preserve"; the authors' PyramidDrop code renumbers, our
  "compact" policy);
- `attention_layer="previous"` scores with layer k − 1's row instead (FastV's choice), for comparison.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_prune.engine.context import SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError
from vlm_prune.methods.adaptinfer import (
    Schedule,
    cumulative,
    equivalent_average_tokens,
    schedule_stages,
    solve_geometric_ratio,
)
from vlm_prune.methods.base import Method, Stage, topk_mask_per_media
from vlm_prune.methods.calibration import demo_preset_folder
from vlm_prune.methods.registry import register

#: the authors' stage layers for a 32-layer LLM, as fractions of depth
AUTHORS_LAYERS_32: tuple[int, ...] = (8, 16, 24)
#: the authors' keep ratios: fraction of the original spatial tokens each segment of layers sees
AUTHORS_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
DEPTH_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
PRESET_VERSION = 1
#: folder of calibrated presets inside an embedded demo model's directory
DEMO_PRESET_FOLDER = "adatoken3d_presets"

# ---------------------------------------------------------------------------------------------------
# Scoring


def last_token_scores(rows: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of one query row over the spatial tokens.

    rows: (H, 1, L) attention probabilities of the last instruction token; visual_index: (N,) long positions.
    Returns (N,) float32.
    """
    if rows.dim() != 3 or rows.shape[1] != 1:
        raise ValueError(f"expected (H, 1, L) attention of one query row, got {tuple(rows.shape)}")
    return rows[:, 0, :].float().mean(dim=0)[visual_index.to(rows.device)]


# ---------------------------------------------------------------------------------------------------
# Schedules


def scaled_layers(num_layers: int, fractions: Sequence[float] = DEPTH_FRACTIONS) -> tuple[int, ...]:
    """Stage layers for an L-layer LLM: round-half-up(f · L), at least 1, strictly increasing, below L."""
    layers: list[int] = []
    for f in fractions:
        k = max(layers[-1] + 1 if layers else 1, int(math.floor(f * num_layers + 0.5)))
        if k >= num_layers:
            break
        layers.append(k)
    if not layers:
        raise BudgetError(f"AdaToken-3D needs at least 2 decoder layers, the model has {num_layers}")
    return tuple(layers)


def authors_schedule(num_layers: int) -> Schedule:
    """The released schedule (stages at L/4, L/2, 3L/4; keeps 0.5, 0.25, 0.125) scaled to `num_layers`."""
    layers = scaled_layers(num_layers)
    return Schedule(layers, tuple(AUTHORS_RATIOS[1 : 1 + len(layers)]), "authors")


def derive_schedule(keep: float, num_layers: int) -> Schedule:
    """The authors' layers with one geometric ratio so that the equivalent average equals keep (see docstring)."""
    if not 0 < keep <= 1:
        raise BudgetError(f"AdaToken-3D keep must be a fraction in (0, 1], got {keep!r}")
    layers = scaled_layers(num_layers)
    if keep * num_layers <= layers[0]:
        if keep * num_layers <= 1:
            raise BudgetError(
                f"AdaToken-3D cannot average keep={keep} over {num_layers} layers: decoder layer 0 always sees every "
                f"spatial token, so the minimum is above 1/{num_layers}; use a pre-LLM method or a larger keep"
            )
        layers = (1, *[k for k in layers if k > 1])
    ratio = 1.0 if keep >= 1 else solve_geometric_ratio(layers, num_layers, keep)
    return Schedule(tuple(layers), cumulative([ratio] * len(layers)), "derived")


def schedule_from_ratios(layers: Sequence[int], ratios: Sequence[float]) -> Schedule:
    """`layers` with the authors' style cumulative `ratios` ([1, r1, r2, ...] or [r1, r2, ...])."""
    ratios = [float(r) for r in ratios]
    if len(ratios) == len(layers) + 1:
        if abs(ratios[0] - 1.0) > 1e-9:
            raise MethodOptionError(f"ratios with one more entry than layers must start at 1.0, got {ratios}")
        ratios = ratios[1:]
    if len(ratios) != len(layers):
        raise MethodOptionError(f"AdaToken-3D: {len(layers)} layers need {len(layers)} (or +1) ratios, got {ratios}")
    if any(not 0 < r <= 1 for r in ratios) or any(b > a + 1e-12 for a, b in zip(ratios, ratios[1:])):
        raise MethodOptionError(f"AdaToken-3D ratios must be fractions in (0, 1], non-increasing, got {ratios}")
    return Schedule(tuple(int(k) for k in layers), tuple(ratios), "explicit")


# ---------------------------------------------------------------------------------------------------
# Calibration ("tailoring"), pure functions


def spatial_share(rows: torch.Tensor, visual_pos: torch.Tensor) -> float:
    """Share of the head-averaged attention of the query rows (H, Q, L) that lands on spatial tokens (N,)."""
    rows = rows.float().mean(dim=0)  # (Q, L)
    total = rows.sum()
    return float(rows[:, visual_pos].sum() / total) if total > 0 else 0.0


def low_contribution_fraction(scores: torch.Tensor, mass: float = 0.05) -> float:
    """Largest fraction of tokens, least attended first, whose scores (N,) sum to less than `mass` of the total."""
    n = scores.numel()
    if n == 0:
        return 0.0
    total = float(scores.float().sum())
    if total <= 0:
        return 1.0
    running = torch.cumsum(torch.sort(scores.float()).values, dim=0) / total
    return float((running < mass).sum()) / n


def needed_fractions(
    shares: Sequence[float], low_fractions: Sequence[float], *, min_share: float = 0.02, min_keep: float = 0.05
) -> list[float]:
    """r_l per layer: 1 − f_l where the spatial share is at least `min_share`, else `min_keep` (see docstring)."""
    return [max(min_keep, 1.0 - float(f)) if float(s) >= min_share else min_keep for s, f in zip(shares, low_fractions)]


def propose_schedule(
    shares: Sequence[float],
    low_fractions: Sequence[float],
    n_stages: int = 3,
    *,
    min_share: float = 0.02,
    min_keep: float = 0.05,
) -> Schedule:
    """The stage layers and cumulative keeps that minimise the equivalent average tokens (see docstring)."""
    num_layers = len(shares)
    if num_layers != len(low_fractions):
        raise ValueError("one share and one low-contribution fraction per layer")
    if num_layers < 2 or n_stages < 1:
        raise BudgetError(f"cannot place {n_stages} pruning stages in a {num_layers}-layer model")
    need = needed_fractions(shares, low_fractions, min_share=min_share, min_keep=min_keep)
    suffix = [max(need[k:]) for k in range(num_layers)]
    best: tuple[float, tuple[int, ...]] | None = None
    for layers in itertools.combinations(range(1, num_layers), min(n_stages, num_layers - 1)):
        keeps = tuple(suffix[k] for k in layers)
        cost = equivalent_average_tokens(Schedule(layers, keeps), num_layers, 1)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, layers)
    assert best is not None
    layers = best[1]
    return Schedule(layers, tuple(round(suffix[k], 6) for k in layers), "calibrated")


def save_preset(path: str | Path, schedule: Schedule, **measurements: Any) -> Path:
    """Write a JSON preset: the schedule (`layers`, `stage_keep`) and the measurements behind it."""
    data: dict[str, Any] = {
        "version": PRESET_VERSION,
        "method": "adatoken3d",
        "layers": list(schedule.layers),
        "stage_keep": [float(k) for k in schedule.keep],
        "source": schedule.source,
        **measurements,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_preset(path: str | Path) -> Schedule:
    """A `Schedule` from a JSON preset written by `save_preset` (or the AdaptInfer calibration)."""
    path = Path(path)
    if not path.is_file():
        raise BudgetError(f"AdaToken-3D preset {str(path)!r} not found: pass 'authors' or a JSON preset path")
    data = json.loads(path.read_text())
    if data.get("version") != PRESET_VERSION or "layers" not in data or "stage_keep" not in data:
        raise BudgetError(f"{path} is not a vlm_prune schedule preset (version {PRESET_VERSION})")
    return Schedule(tuple(int(k) for k in data["layers"]), tuple(float(k) for k in data["stage_keep"]), str(path))


def demo_preset(info: Any, keep: float | int | None) -> Path | None:
    """The calibrated preset an embedded demo model ships for `keep` (equivalent average within 1e-3), or None."""
    if keep is None or isinstance(keep, (bool, int)):
        return None
    folder = demo_preset_folder(info, DEMO_PRESET_FOLDER)
    if folder is None:
        return None
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("num_layers") != getattr(info, "num_layers", None) or data.get("keep") is None:
            continue
        if abs(float(data["keep"]) - float(keep)) < 1e-3:
            return path
    return None


# ---------------------------------------------------------------------------------------------------
# The method


@dataclass(repr=True)
class AdaToken3D(Method):
    """AdaToken-3D (arXiv 2505.12782): the last instruction token's attention gates spatial tokens in stages.

    keep: None = the authors' schedule (scaled to depth), or the equivalent average fraction of spatial tokens
        over layers (fraction in (0, 1]).
    preset: "authors" or a JSON preset path (from `vlm-prune calibrate --method adatoken3d`).
    layers, ratios: an explicit schedule (input layer of each stage; the authors' cumulative keep ratios).
    schedule: an explicit `Schedule` (wins over everything).
    num_layers: decoder depth, for resolving the schedule before / without `bind()`.
    attention_layer: "next" (authors: layer k's own q/k on the stage input) or "previous" (layer k − 1).
    """

    keep: float | int | None = None
    preset: str | None = None
    layers: Sequence[int] | None = None
    ratios: Sequence[float] | None = None
    schedule: Schedule | None = None
    num_layers: int | None = None
    attention_layer: str = "next"
    _info: Any = field(default=None, init=False, repr=False, compare=False)

    name = "adatoken3d"
    needs = frozenset({"attention"})
    layer = 1

    def __post_init__(self) -> None:
        if self.attention_layer not in ("next", "previous"):
            raise MethodOptionError(f"attention_layer must be 'next' or 'previous', got {self.attention_layer!r}")

    def bind(self, info: Any) -> AdaToken3D:
        """Remember the model (`.num_layers`, `.name_or_path`) to scale the schedule and find shipped presets."""
        self._info = info
        return self

    def _depth(self) -> int:
        depth = self.num_layers or getattr(self._info, "num_layers", None)
        if not depth:
            raise BudgetError("AdaToken-3D needs the decoder depth: pass num_layers=..., or let apply() bind the model")
        return int(depth)

    def resolve_schedule(self) -> Schedule:
        """The schedule `stages()` uses (rules in the module docstring)."""
        if self.schedule is not None:
            return self.schedule
        if self.layers is not None or self.ratios is not None:
            if self.layers is None or self.ratios is None:
                raise BudgetError("AdaToken-3D: pass both layers=[...] and ratios=[...]")
            return schedule_from_ratios(self.layers, self.ratios)
        if self.preset is not None:
            if str(self.preset).lower() == "authors":
                return authors_schedule(self._depth())
            return load_preset(self.preset)
        shipped = demo_preset(self._info, self.keep)
        if shipped is not None:
            return load_preset(shipped)
        if self.keep is None:
            return authors_schedule(self._depth())
        if isinstance(self.keep, int) and not isinstance(self.keep, bool):
            raise BudgetError(
                f"AdaToken-3D keep={self.keep} is a token count; pass keep as a fraction in (0, 1] (equivalent "
                "average spatial tokens over layers), or keep=None for the authors' schedule"
            )
        return derive_schedule(float(self.keep), self._depth())

    def stages(self) -> list[Stage]:
        depth = self.num_layers or getattr(self._info, "num_layers", None)
        return schedule_stages(self.resolve_schedule(), depth, self.select, self.needs, "AdaToken-3D", "adatoken3d")

    def score(self, ctx: SelectionContext) -> torch.Tensor:
        """(N,) head-averaged attention of the last prompt token over this sample's spatial tokens."""
        layer = ctx.layer if self.attention_layer == "next" else ctx.layer - 1
        return last_token_scores(ctx.attention_rows(ctx.last_index, layer=layer), ctx.visual_index)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.budget_per_media is None:
            raise BudgetError("AdaToken-3D needs a budget per stage; pass keep=... or use its default schedule")
        scores = self.score(ctx).to(ctx.layout.media_index.device)
        return topk_mask_per_media(scores, ctx.layout.media_index, ctx.budget_per_media)


register(
    "adatoken3d",
    AdaToken3D,
    "AdaToken-3D (2505.12782): the last instruction token's attention gates spatial tokens at L/4, L/2, 3L/4 "
    "(keeps 1/2, 1/4, 1/8).",
)

"""Offline calibration of in-LLM pruning schedules: where does cross-modal attention shift?

AdaptInfer (arXiv 2508.06084) chooses its pruning layers from an offline "inflection layer" analysis
that the authors did not publish. This module is our documented substitute, as pure functions over
attention rows; `vlm_prune.calibrate_runner.calibrate` runs a model on sample inputs to feed them, and
the `vlm-prune calibrate` command saves the result as a JSON preset that `AdaptInfer(preset=path)`
loads.

Rules (ours):
- `cross_modal_share`: for one layer, the share of the text queries' attention to CONTENT tokens
  (visual + text after the media) that lands on visual tokens, pooled over heads and queries:
  Σ A[:, :, V] / (Σ A[:, :, V] + Σ A[:, :, T]). The system prompt / BOS "attention sink" is left out
  of the denominator, because it absorbs most of the mass in most layers and would flatten the curve.
- `inflection_layers`: Δ_l = |s_{l+1} − s_l| for l = 0..L−2; the n largest, greedily, at least
  `min_gap` layers apart (default max(1, L // (2n))), ties to the earlier layer, returned sorted;
  a layer with no change (Δ = 0) is never an inflection, so fewer than n may come back.
  Layer l is the last layer BEFORE the shift: pruning then runs on the input of layer l + 1 and
  scores with layer l's attention (the authors' "prune at the output of layer l").
- `propose_schedule`: stages on the input of layers l + 1, per-stage ratios from the same geometric
  rule as `adaptinfer.derive_schedule` (equivalent average tokens = keep · N).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlm_prune.errors import BudgetError
from vlm_prune.methods.adaptinfer import Schedule, cumulative, solve_geometric_ratio

PRESET_VERSION = 1

#: Folder, inside an embedded demo model's directory (`vlm_prune/demo_models/<name>/`), holding its calibrated
#: AdaptInfer presets: one `vlm-prune calibrate` JSON per budget (regenerate: benchmarks/calibrate_demo_models.sh).
DEMO_PRESET_FOLDER = "adaptinfer_presets"
#: Visual tokens per image of both embedded demo models (a 192x192 mosaic -> 24 x 24 tokens).
DEMO_VISUAL_TOKENS = 576


def cross_modal_share(rows: torch.Tensor, visual_pos: torch.Tensor, text_pos: torch.Tensor) -> float:
    """Share of content attention that goes to visual tokens, for one layer.

    rows: (H, Q, L) attention probabilities of the text queries.
    visual_pos: (N,) visual token positions; text_pos: (T,) text positions after the media.
    Returns a float in [0, 1] (0.0 when there is no content attention at all).
    """
    rows = rows.float()
    to_visual = rows[:, :, visual_pos].sum()
    to_text = rows[:, :, text_pos].sum()
    total = to_visual + to_text
    return float(to_visual / total) if total > 0 else 0.0


def inflection_layers(shares_per_layer: Sequence[float], n: int = 3, min_gap: int | None = None) -> list[int]:
    """Layers l after which the cross-modal share changes most (see the module docstring), sorted."""
    shares = [float(s) for s in shares_per_layer]
    num_layers = len(shares)
    if num_layers < 2 or n <= 0:
        return []
    gap = max(1, num_layers // (2 * n)) if min_gap is None else max(1, int(min_gap))
    deltas = [abs(shares[i + 1] - shares[i]) for i in range(num_layers - 1)]
    order = sorted((i for i in range(len(deltas)) if deltas[i] > 0), key=lambda i: (-deltas[i], i))
    chosen: list[int] = []
    for layer in order:
        if all(abs(layer - c) >= gap for c in chosen):
            chosen.append(layer)
        if len(chosen) == n:
            break
    return sorted(chosen)


def propose_schedule(
    shares_per_layer: Sequence[float], keep: float, n_stages: int = 3, min_gap: int | None = None
) -> Schedule:
    """A schedule from measured shares: stages at inflection + 1, geometric ratios for `keep`."""
    num_layers = len(shares_per_layer)
    layers = [layer + 1 for layer in inflection_layers(shares_per_layer, n_stages, min_gap)]
    layers = [k for k in layers if k < num_layers]
    if not layers:
        raise BudgetError(f"cannot place pruning stages in a {num_layers}-layer model")
    if not 0 < keep <= 1:
        raise BudgetError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if keep * num_layers <= layers[0]:
        if keep * num_layers <= 1:
            raise BudgetError(f"keep={keep} is below what {num_layers} layers can average (layer 0 sees everything)")
        layers = [1, *[k for k in layers if k > 1]]
    ratio = 1.0 if keep >= 1 else solve_geometric_ratio(layers, num_layers, keep)
    return Schedule(tuple(layers), cumulative([ratio] * len(layers)), "calibrated")


def save_preset(
    path: str | Path,
    schedule: Schedule,
    *,
    model: str = "",
    num_layers: int | None = None,
    shares: Sequence[float] | None = None,
    inflection: Sequence[int] | None = None,
    keep: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a JSON preset (schedule plus the measurements behind it); returns the path."""
    data: dict[str, Any] = {
        "version": PRESET_VERSION,
        "method": "adaptinfer",
        "model": model,
        "num_layers": num_layers,
        "keep": keep,
        "layers": list(schedule.layers),
        "stage_keep": list(schedule.keep),
        "source": schedule.source,
        "shares": [float(s) for s in shares] if shares is not None else None,
        "inflection_layers": list(inflection) if inflection is not None else None,
    }
    if extra:
        data.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_preset(path: str | Path) -> Schedule:
    """Read a JSON preset written by `save_preset` back into a `Schedule`."""
    data = json.loads(Path(path).read_text())
    if data.get("version") != PRESET_VERSION or "layers" not in data or "stage_keep" not in data:
        raise BudgetError(f"{path} is not a vlm_prune schedule preset (version {PRESET_VERSION})")
    keep = tuple(k if isinstance(k, int) else float(k) for k in data["stage_keep"])
    return Schedule(tuple(int(k) for k in data["layers"]), keep, data.get("source") or str(path))


def demo_preset_folder(info: Any, folder_name: str) -> Path | None:
    """`<model folder>/<folder_name>` when the bound model is an embedded demo model that ships it, else None.

    info: the bound model (`.name_or_path`); only folders under `vlm_prune/demo_models/` count.
    """
    name = str(getattr(info, "name_or_path", "") or "") if info is not None else ""
    if not name:
        return None
    demo_dir = (Path(__file__).resolve().parents[1] / "demo_models").resolve()
    folder = Path(name).resolve() / folder_name
    if folder.parent.parent != demo_dir or not folder.is_dir():
        return None
    return folder


def demo_preset(info: Any, keep: float | int | None) -> Path | None:
    """The calibrated preset shipped with an embedded demo model for budget `keep`, or None.

    info: the bound model (`.name_or_path`, `.num_layers`); only the folders under `vlm_prune/demo_models/`
        count. keep: an int token count per image, or a fraction; a preset matches when its budget is
        within half a token of it (at 576 visual tokens), as the authors' LLaVA presets match. A preset
        written for another depth (a stale file) never matches.
    """
    if keep is None or isinstance(keep, bool):
        return None
    folder = demo_preset_folder(info, DEMO_PRESET_FOLDER)
    if folder is None:
        return None
    tokens = keep if isinstance(keep, int) else float(keep) * DEMO_VISUAL_TOKENS
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("num_layers") != getattr(info, "num_layers", None) or data.get("keep") is None:
            continue
        if abs(float(data["keep"]) * DEMO_VISUAL_TOKENS - tokens) < 0.5:
            return path
    return None

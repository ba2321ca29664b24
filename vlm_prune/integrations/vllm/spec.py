"""The pruning setting a vLLM model opts into, and `count(grid, spec)`: pure, no vLLM import.

A model opts in through `--hf-overrides`, which vLLM merges into the Hugging Face config:

    {"architectures": ["VlmPruneQwen2_5_VLForConditionalGeneration"],
     "vlm_prune": {"method": "divprune", "keep": 64}}

The "vlm_prune" dict holds `method` (one pre-LLM method name: random, pool, divprune, zoo, visionzip, evs), `keep`
(a fraction in (0, 1] or an int count per media item, as `vlm_prune.apply`), optionally `seed` (default 0, as
`apply`), `modalities` (a subset of ["image", "video"]; default: what the method prunes) and any other key as an
option of the method (e.g. `"rate": 0.75` for evs, `"estimator": "central"` for zoo). `random` always runs with
`per_item=True` (each item from its own generator: vLLM encodes items apart from their prompt).

`count(grid, spec)` is the one function that sizes a media item after pruning. The processor emits that many
placeholders before anything is encoded, and the model's selection (`select.py`) keeps exactly that many rows
(tested for many grids and budgets). It follows the transformers engine's rule: a stage with a budget keeps
`tokens_to_keep(keep, n, n)` of the item's n tokens; a stage that counts itself (EVS) keeps `EVS.count(grid, rate)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_prune.engine.budget import tokens_to_keep, validate_keep
from vlm_prune.errors import MethodOptionError, PruneError

#: pre-LLM methods whose count depends only on the grid and the budget (so placeholders can be sized up front)
METHODS = ("random", "pool", "divprune", "zoo", "visionzip", "evs")
MODALITIES = ("image", "video")
#: the key of the setting in the Hugging Face config (and in --hf-overrides)
CONFIG_KEY = "vlm_prune"
_SPEC_KEYS = ("method", "keep", "seed", "modalities")


@dataclass(frozen=True)
class PruneSpec:
    """One model's pruning setting (hashable: the multimodal cache keys on `cache_key()`)."""

    method: str
    keep: float | int | None = None
    seed: int = 0
    modalities: tuple[str, ...] = MODALITIES
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def build(self):
        """The vlm_prune `Method` instance and its single pre-LLM `Stage`, exactly as `vlm_prune.apply` builds them."""
        from vlm_prune.api import _build_methods, _check_budgets

        (method,) = _build_methods(self.method, self.keep, dict(self.options))
        stages = method.stages()
        _check_budgets(method, stages, named=True)
        if len(stages) != 1 or stages[0].layer != 0:
            raise PruneError(f"{self.method!r} is not a single pre-LLM stage; the vLLM plugin runs pre-LLM methods")
        return method, stages[0]

    def prunes(self, modality: str) -> bool:
        return modality in self.modalities

    def cache_key(self) -> str:
        """A stable string of the whole setting, for the multimodal processor cache."""
        return json.dumps(
            {"method": self.method, "keep": self.keep, "seed": self.seed, "modalities": list(self.modalities),
             "options": [list(o) for o in self.options]},
            sort_keys=True,
        )


def parse_spec(raw: object) -> PruneSpec:
    """The "vlm_prune" dict of the config -> a validated `PruneSpec` (PruneError saying what to pass)."""
    if isinstance(raw, PruneSpec):
        return raw
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise PruneError(f"the {CONFIG_KEY!r} setting is not JSON: {error}") from None
    if not isinstance(raw, Mapping) or "method" not in raw:
        raise PruneError(
            f"the {CONFIG_KEY!r} setting must be a dict with at least a method, e.g. "
            f'--hf-overrides \'{{"{CONFIG_KEY}": {{"method": "divprune", "keep": 64}}, "architectures": [...]}}\''
        )
    method = str(raw["method"]).strip().lower()
    if "+" in method or method not in METHODS:
        raise PruneError(
            f"the vLLM plugin runs one pre-LLM method whose token count depends only on the grid and the budget: "
            f"{', '.join(METHODS)}; got {raw['method']!r}"
        )
    keep = validate_keep(raw.get("keep"))
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PruneError(f"{CONFIG_KEY}.seed must be an int, got {seed!r}")
    default = ("video",) if method == "evs" else MODALITIES
    modalities = raw.get("modalities", default)
    if isinstance(modalities, str):
        modalities = (modalities,)
    modalities = tuple(str(m) for m in modalities)
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise PruneError(f"{CONFIG_KEY}.modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities}")
    if method == "evs" and "image" in modalities:
        raise PruneError("evs prunes video only; drop 'image' from modalities or choose an image method")
    extra = {str(k): v for k, v in raw.items() if k not in _SPEC_KEYS}
    if method == "random":
        # vLLM encodes (and caches) every item apart from its prompt: each item draws from its own generator
        if extra.setdefault("per_item", True) is not True:
            raise PruneError(
                "in vLLM, random draws every media item from its own generator (per_item=True; vLLM encodes items "
                "apart from their prompt); drop per_item=False, and pass per_item=True to vlm_prune.apply for the "
                "same tokens"
            )
    options = tuple(sorted(extra.items()))
    spec = PruneSpec(method=method, keep=keep, seed=int(seed), modalities=modalities, options=options)
    try:
        spec.build()  # unknown options, a missing budget, a bad rate: refused now, in the front end
    except TypeError as error:
        raise MethodOptionError(str(error)) from None
    return spec


def spec_from_config(hf_config: object) -> PruneSpec | None:
    """The setting a (Hugging Face) config carries under "vlm_prune", or None when the model did not opt in."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None and isinstance(hf_config, Mapping):
        raw = hf_config.get(CONFIG_KEY)
    return None if raw is None else parse_spec(raw)


def llm_grid(grid: tuple[int, int, int] | list[int], merge_size: int) -> tuple[int, int, int]:
    """A vision grid (t, h, w) in patches (Qwen's `image_grid_thw` row) -> the LLM token grid (t, h/m, w/m)."""
    t, h, w = (int(v) for v in grid)
    if h % merge_size or w % merge_size:
        raise PruneError(f"grid {(t, h, w)} is not divisible by the spatial merge size {merge_size}")
    return t, h // merge_size, w // merge_size


def count(grid: tuple[int, int, int] | list[int], spec: PruneSpec, modality: str = "image", merge_size: int = 2) -> int:
    """Tokens one media item keeps: the placeholders the processor emits and the rows the model selects.

    grid: (t, h, w) of the vision grid in patches, as in `image_grid_thw` / `video_grid_thw`.
    modality: "image" or "video"; a modality the spec does not prune keeps all t*(h/m)*(w/m) tokens.
    """
    t, h, w = llm_grid(grid, merge_size)
    n = t * h * w
    if not spec.prunes(modality):
        return n
    method, stage = spec.build()
    if stage.counts_itself:
        return int(method.count((t, h, w), method.resolved_rate()))
    return tokens_to_keep(stage.keep, n, n)

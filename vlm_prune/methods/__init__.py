"""Pruning methods: small scoring/selection functions plus where they run (see DESIGN.md).

Importing this package registers every built-in method; `available()` lists them.
"""

from vlm_prune.methods import catp, divprune, evs, fastv, pool, prunevid, random, zoo  # noqa: F401  (registers them)
from vlm_prune.methods.base import Method, ScorerMethod, Stage, per_media, topk_mask, topk_mask_per_media
from vlm_prune.methods.registry import available, get_method, get_methods, parse_spec, register

# Methods written in parallel; registered when their modules are present.
try:
    from vlm_prune.methods import adaptinfer  # noqa: F401
except ImportError:
    pass
try:
    from vlm_prune.methods import visionzip  # noqa: F401
except ImportError:
    pass
try:
    from vlm_prune.methods import lvlm_csp  # noqa: F401
except ImportError:
    pass
try:
    from vlm_prune.methods import adatoken3d  # noqa: F401
except ImportError:
    pass

__all__ = [
    "Method",
    "ScorerMethod",
    "Stage",
    "available",
    "get_method",
    "get_methods",
    "parse_spec",
    "per_media",
    "register",
    "topk_mask",
    "topk_mask_per_media",
]

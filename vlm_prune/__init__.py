"""vlm_prune: training-free visual-token pruning for Hugging Face vision-language models.

import vlm_prune
handle = vlm_prune.apply(model, "fastv", keep=0.25)
out = model.generate(**inputs)
print(handle.stats)
handle.remove()
"""

from vlm_prune.api import ModelInfo, apply, methods, pruned, supported_models
from vlm_prune.engine.context import BatchSelectionContext, Selection, SelectionContext, VisualLayout
from vlm_prune.engine.handle import PruneHandle
from vlm_prune.errors import (
    AttentionImplementationError,
    BudgetError,
    InputError,
    MediaKindError,
    MethodOptionError,
    PruneError,
    UnknownMethodError,
    UnsupportedModelError,
)
from vlm_prune.methods.base import Method, ScorerMethod, Stage

__version__ = "0.1.0"


def demo_model(name: str = "llava"):
    """The embedded demo model and its processor (offline): "llava" or "qwen2_vl"."""
    from vlm_prune.demo import demo_model as _demo_model

    return _demo_model(name)


__all__ = [
    "AttentionImplementationError",
    "BatchSelectionContext",
    "BudgetError",
    "InputError",
    "MediaKindError",
    "MethodOptionError",
    "Method",
    "ModelInfo",
    "PruneError",
    "PruneHandle",
    "ScorerMethod",
    "Selection",
    "SelectionContext",
    "Stage",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VisualLayout",
    "apply",
    "demo_model",
    "methods",
    "pruned",
    "supported_models",
]

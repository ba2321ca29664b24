"""vlm_prune as a vLLM general plugin: pre-LLM visual-token pruning inside vLLM's multimodal embedding path.

Entry point (pyproject.toml): group `vllm.general_plugins`, `vlm_prune = "vlm_prune.integrations.vllm:register"`.
vLLM calls `register()` in every process it starts (front end, engine core, workers, the model-inspection
subprocess). It is idempotent and changes nothing for models that do not opt in: it registers NEW architecture
names (`ModelRegistry.register_model(name, "module:Class")`, lazily imported; vLLM's own classes are never
replaced) and wraps the model runners' `load_model` to set the pruning flag for models that ask for it
(`runner.py`). A model opts in with

    --hf-overrides '{"architectures": ["VlmPruneQwen2_5_VLForConditionalGeneration"],
                     "vlm_prune": {"method": "divprune", "keep": 64}}'

Architectures: `VlmPruneQwen2_5_VLForConditionalGeneration`, `VlmPruneQwen2VLForConditionalGeneration`,
`VlmPruneQwen3VLForConditionalGeneration` (images and video each).

Modules: `spec` (the setting and `count(grid, spec)`, pure), `select` (one item's selection with vlm_prune's own
method code, pure), `positions` (M-RoPE of a pruned prompt before and after encoding, pure), `processor`
(placeholder counts, cache key), `models` (the subclasses), `qwen3` (Qwen3-VL's deepstack and timestamped frames),
`runner` (the flag fix), `compat` (every vLLM-internal import, version-checked), `testing` (offline checkpoints).
"""

from __future__ import annotations

from vlm_prune.integrations.vllm.spec import METHODS, PruneSpec, count, parse_spec

__all__ = ["METHODS", "PruneSpec", "count", "parse_spec", "register"]

_REGISTERED = False


def register() -> None:
    """vLLM's general-plugin hook: register our architecture names and the runner fix (idempotent).

    Cheap and harmless for models that do not opt in: the names are registered lazily ("module:Class", nothing is
    imported until a model asks for one). On a vLLM version the plugin does not support, the runners are left
    alone (a warning says why) and a model that opts in fails with `compat.VllmVersionError` naming the versions.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import logging

    from vllm import ModelRegistry

    from vlm_prune.integrations.vllm import compat
    from vlm_prune.integrations.vllm.models import ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for name in ARCHITECTURES:
        if name not in supported:
            ModelRegistry.register_model(name, f"vlm_prune.integrations.vllm.models:{name}")
    try:
        from vlm_prune.integrations.vllm.runner import patch_runners

        patch_runners()
    except compat.VllmVersionError as error:
        logging.getLogger("vlm_prune").warning("vlm_prune's vLLM plugin is inactive: %s", error)
    _REGISTERED = True

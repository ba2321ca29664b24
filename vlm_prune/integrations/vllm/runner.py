"""The model-runner flag fix: recompute M-RoPE positions for models that prune their multimodal embeddings.

vLLM's runners recompute a request's M-RoPE positions after encoding (`recompute_mrope_positions`) only when their
`is_multimodal_pruning_enabled` is set. `GPUModelRunner.load_model` sets it only from `--video-pruning-rate`, and
the CPU runner (`v1/worker/cpu_model_runner.py`, which overrides `load_model`) never sets it: there, with
`video_pruning_rate > 0`, every multimodal request, even an image, kills the engine with a shape mismatch in
`_merge_multimodal_embeddings` (the model appends position columns that are never stripped; a vLLM bug).

`patch_runners()` wraps both runners' `load_model` (once per class, idempotent): after loading, the flag is set
when the model asks for it, i.e. one of our models (`is_multimodal_pruning_enabled` on the instance) or any
pruning-capable model with video pruning on. The V2 GPU model runner has its own pruning path
(`v1/worker/gpu/model_states/mm_pruning.py`, keyed on `--video-pruning-rate` only) that this does not reach.
"""

from __future__ import annotations

import functools

from vlm_prune.integrations.vllm import compat

_MARK = "_vlm_prune_wrapped"


def wants_pruning(runner: object, model: object) -> bool:
    """Whether the runner must recompute positions for `model` (see the module docstring)."""
    vllm = compat.load()
    if not vllm.supports_multimodal_pruning(model):
        return False
    if getattr(model, "vlm_prune_spec", None) is not None:
        return True
    mm_config = runner.model_config.multimodal_config  # type: ignore[attr-defined]
    return mm_config is not None and bool(mm_config.is_multimodal_pruning_enabled())


def _wrap(cls: type) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        model = self.get_model()
        if wants_pruning(self, model):
            self.is_multimodal_pruning_enabled = True
        return result

    setattr(load_model, _MARK, True)
    cls.load_model = load_model


def patch_runners() -> None:
    vllm = compat.load()
    for cls in (vllm.GPUModelRunner, vllm.CPUModelRunner):
        if cls is not None:
            _wrap(cls)

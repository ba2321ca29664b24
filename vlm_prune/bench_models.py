"""Model loading for `vlm-prune bench`: an embedded demo model, a local folder or a hub id, with errors that
say what to pass."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import PruneError


class ModelSpecError(PruneError, ValueError):
    """A model spec that is neither an embedded demo model, a loadable local folder, nor a reachable hub id."""


def _model_spec_help() -> str:
    from .demo import DEMO_MODELS, ICL_DEMO_MODELS, VIDEO_DEMO_MODELS

    names = " or ".join(repr(m) for m in DEMO_MODELS + VIDEO_DEMO_MODELS + ICL_DEMO_MODELS)
    return (
        f"pass an embedded demo model ({names}), a local folder written by "
        "model.save_pretrained + processor.save_pretrained (it holds config.json and *.safetensors), or a "
        "Hugging Face hub id such as 'llava-hf/llava-1.5-7b-hf' (needs network access or a cached copy)"
    )


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a filesystem path (a hub id is "name" or "owner/name")."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or re.match(r"^[A-Za-z]:", spec):
        return True
    return spec.count("/") > 1 or spec.endswith("/")


def load_bench_model(model_spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor, info) for an embedded demo name, a local folder or a hub id.

    Raises `ModelSpecError` saying what to pass when the spec cannot be loaded.
    """
    from .demo import DEMO_MODELS, ICL_DEMO_MODELS, VIDEO_DEMO_MODELS, DemoModelError, demo_model, load_model

    spec = str(model_spec).strip()
    if not spec:
        raise ModelSpecError(f"no model given: {_model_spec_help()}")
    key = spec.lower().replace("-", "_")
    if key in DEMO_MODELS + VIDEO_DEMO_MODELS + ICL_DEMO_MODELS or key in ("qwen2vl", "qwen", "llava_1.5", "video"):
        try:
            model, processor = demo_model(spec, dtype=dtype, device=device)
        except DemoModelError as e:
            raise ModelSpecError(f"{e}; or {_model_spec_help()}") from e
        return model, processor, {"spec": spec, "source": "embedded"}
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSpecError(f"model path {spec!r} is a file, not a model folder: {_model_spec_help()}")
        try:
            model, processor = load_model(path, dtype=dtype, device=device)
        except DemoModelError as e:
            raise ModelSpecError(f"cannot load a model from {spec!r}: {e}; {_model_spec_help()}") from e
        return model, processor, {"spec": spec, "source": "local"}
    if _looks_like_path(spec):
        raise ModelSpecError(f"model path {spec!r} does not exist: {_model_spec_help()}")
    local_only = _probe_hub(spec)
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(spec, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f"could not load hub model {spec!r} ({first}): {_model_spec_help()}") from e
    return model.to(device).eval(), processor, {"spec": spec, "source": "hub"}


def _probe_hub(spec: str) -> bool:
    """Whether `spec` must load from the local hub cache (True) or may download (False).

    Fails fast with `ModelSpecError` when the id is neither cached nor reachable, instead of letting
    transformers retry every file download for minutes.
    """
    try:
        import huggingface_hub as hub
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        cached = hub.try_to_load_from_cache(spec, "config.json")
    except (ValueError, TypeError) as e:  # not a valid repo id
        raise ModelSpecError(f"{spec!r} is not a local folder nor a valid hub id ({e}): {_model_spec_help()}") from e
    if isinstance(cached, str):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelSpecError(
            f"{spec!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE is set: {_model_spec_help()}"
        )
    try:
        hub.model_info(spec, timeout=10)
    except Exception as e:  # noqa: BLE001 - repository missing, gated, or no network: one clear message
        raise ModelSpecError(
            f"{spec!r} is not a local folder, not in the hub cache, and the hub lookup failed "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}): {_model_spec_help()}"
        ) from e
    return False


def _short_name(model_spec: str) -> str:
    name = Path(str(model_spec).rstrip("/")).name or str(model_spec)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"

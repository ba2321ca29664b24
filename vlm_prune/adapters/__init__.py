"""Model-family adapters, found from the model's class (also when loaded through an Auto class)."""

from __future__ import annotations

from torch import nn

from vlm_prune.adapters.base import Adapter, ProjectorParts, SampleMedia
from vlm_prune.adapters.llava import LlavaAdapter, LlavaNextAdapter
from vlm_prune.adapters.llava3d import Llava3DAdapter
from vlm_prune.adapters.llava_video import LlavaNextVideoAdapter, LlavaOnevisionAdapter
from vlm_prune.adapters.qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter
from vlm_prune.errors import UnsupportedModelError

#: class name of the top-level model -> (adapter, family shown to users)
ADAPTERS: dict[str, tuple[type[Adapter], str]] = {
    "LlavaForConditionalGeneration": (LlavaAdapter, "LLaVA-1.5 (llava-hf/llava-1.5-*-hf)"),
    "LlavaNextForConditionalGeneration": (LlavaNextAdapter, "LLaVA-NeXT / LLaVA-1.6 (anyres)"),
    "LlavaOnevisionForConditionalGeneration": (LlavaOnevisionAdapter, "LLaVA-OneVision (images and video)"),
    "LlavaNextVideoForConditionalGeneration": (LlavaNextVideoAdapter, "LLaVA-NeXT-Video (images and video)"),
    "Qwen2VLForConditionalGeneration": (QwenVLAdapter, "Qwen2-VL"),
    "Qwen2_5_VLForConditionalGeneration": (Qwen25VLAdapter, "Qwen2.5-VL"),
    "Qwen3VLForConditionalGeneration": (Qwen3VLAdapter, "Qwen3-VL (dense)"),
    "Llava3DForConditionalGeneration": (Llava3DAdapter, "LLaVA-3D (vlm_prune.models.llava3d; scenes and images)"),
}


def supported_models() -> dict[str, str]:
    """Supported model classes -> family description."""
    return {name: family for name, (_, family) in ADAPTERS.items()}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or UnsupportedModelError listing the supported families."""
    name = type(model).__name__
    if name not in ADAPTERS:
        families = "; ".join(f"{cls} ({family})" for cls, (_, family) in ADAPTERS.items())
        hint = ""
        if hasattr(model, "language_model") or hasattr(getattr(model, "model", None), "language_model"):
            hint = " If it is a VLM built like one of these, open an issue with its class name."
        raise UnsupportedModelError(
            f"vlm_prune has no adapter for {name}. Supported: {families}. Load the model with "
            f"AutoModelForImageTextToText (not AutoModel) so the generation class is used.{hint}"
        )
    return ADAPTERS[name][0](model)


__all__ = ["ADAPTERS", "Adapter", "ProjectorParts", "SampleMedia", "adapter_for", "supported_models"]

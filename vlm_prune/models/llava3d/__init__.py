"""LLaVA-3D (arXiv 2409.18125) as a transformers-5 model: config, model, processor, converter.

Importing this package registers the config with `AutoConfig` ("llava3d") and the model with `AutoModel` and
`AutoModelForImageTextToText`, so `AutoModelForImageTextToText.from_pretrained(folder)` loads a converted
checkpoint without trust_remote_code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from vlm_prune.models.llava3d.configuration import Llava3DConfig
from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration, Llava3DModel

AutoConfig.register("llava3d", Llava3DConfig, exist_ok=True)
AutoModel.register(Llava3DConfig, Llava3DModel, exist_ok=True)
AutoModelForImageTextToText.register(Llava3DConfig, Llava3DForConditionalGeneration, exist_ok=True)

__all__ = ["Llava3DConfig", "Llava3DForConditionalGeneration", "Llava3DModel"]

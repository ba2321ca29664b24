"""LLaVA-3D (arXiv 2409.18125) as a transformers-5 model: config, model, processor, converter.

Importing this package registers the config with `AutoConfig` ("llava3d") and the model with `AutoModel` and
`AutoModelForImageTextToText`, so `AutoModelForImageTextToText.from_pretrained(folder)` loads a converted
checkpoint without trust_remote_code (`import vlm_prune` alone does not import it: the model classes cost seconds
to import).

Convert the released checkpoint: `python -m vlm_prune.models.llava3d.convert SRC OUT [--clip CLIP_FOLDER]`.
In a 3-D batch every row holds one scene (rows may differ in views and voxel counts); a 2-D batch one image per row.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from vlm_prune.models.llava3d.configuration import Llava3DConfig
from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration, Llava3DModel
from vlm_prune.models.llava3d.processing import Llava3DProcessor

AutoConfig.register("llava3d", Llava3DConfig, exist_ok=True)
AutoModel.register(Llava3DConfig, Llava3DModel, exist_ok=True)
AutoModelForImageTextToText.register(Llava3DConfig, Llava3DForConditionalGeneration, exist_ok=True)

__all__ = ["Llava3DConfig", "Llava3DForConditionalGeneration", "Llava3DModel", "Llava3DProcessor"]

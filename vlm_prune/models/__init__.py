"""Model code above the core that transformers lacks: the LISA-style segmenter (`segmenter`) and its converter
from LISA's checkpoint layout (`segmenter_convert`); LLaVA-3D (`llava3d`: config, model, processor and a converter
from the released checkpoint; importing it registers the Auto classes)."""

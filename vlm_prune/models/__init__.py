"""Model code above the core that transformers lacks: the LISA-style segmenter (`segmenter`) and its converter
from LISA's checkpoint layout (`segmenter_convert`)."""

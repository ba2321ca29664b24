"""The embedded demo models and the mosaic evaluation loop.

`demo_model("llava")` / `demo_model("qwen2_vl")` load two small vision-language models that ship inside the
package (`vlm_prune/demo_models/<name>/`, fp16 safetensors, under 1 MB each). They are real Hugging Face models
(`LlavaForConditionalGeneration`: CLIP ViT + projector + Llama; `Qwen2VLForConditionalGeneration`: Qwen2-VL
ViT + merger + M-RoPE Qwen2 decoder) trained by `benchmarks/train_demo_models.py` on the mosaic task of
`vlm_prune.data.mosaic`. One 192x192 mosaic gives 576 visual tokens in both. They load offline with
`AutoProcessor.from_pretrained(path)` / `AutoModelForImageTextToText.from_pretrained(path)` too (Qwen2-VL's
processor needs torchvision in transformers; without it `load_processor` builds an image-only one).

`evaluate(model, processor, samples)` answers `MosaicSample`s by greedy `model.generate` and scores exact
matches, overall and per question type. It only calls `processor(...)` and `model.generate(...)`, so it
works unchanged for a model wrapped by vlm_prune or for any hub VLM whose processor has a chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import PruneError

DEMO_MODELS: tuple[str, ...] = ("llava", "qwen2_vl")
# the video demo model (vlm_prune.tasks.video; benchmarks/train_video_model.py): loadable by name, not an image model
VIDEO_DEMO_MODELS: tuple[str, ...] = ("qwen2_vl_video",)
# the few-shot demo model (vlm_prune.tasks.icl; benchmarks/train_icl_model.py): loadable by name, 16 tokens per image
ICL_DEMO_MODELS: tuple[str, ...] = ("llava_icl",)
DEMO_MODELS_DIR = Path(__file__).resolve().parent / "demo_models"
_ALIASES = {"qwen2-vl": "qwen2_vl", "qwen2vl": "qwen2_vl", "qwen": "qwen2_vl", "llava-1.5": "llava",
            "qwen2-vl-video": "qwen2_vl_video", "video": "qwen2_vl_video", "llava-icl": "llava_icl"}  # fmt: skip


class DemoModelError(PruneError, ValueError):
    """An unknown demo model name, or a model folder that does not hold a loadable checkpoint."""


class UnknownDemoModelError(DemoModelError, KeyError):
    """A demo model name that is not shipped."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def demo_model_path(name: str = "llava") -> Path:
    """Folder of the embedded checkpoint `name` ("llava", "qwen2_vl", the video model "qwen2_vl_video" or the
    few-shot model "llava_icl")."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DEMO_MODELS + VIDEO_DEMO_MODELS + ICL_DEMO_MODELS:
        names = ", ".join(DEMO_MODELS + VIDEO_DEMO_MODELS + ICL_DEMO_MODELS)
        raise UnknownDemoModelError(f"unknown demo model {name!r}; the embedded models are {names}")
    return DEMO_MODELS_DIR / key


def image_only_qwen2vl_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None):
    """A `Qwen2VLProcessor` without a video processor.

    transformers cannot build `Qwen2VLProcessor` when torchvision is missing (its video processor needs
    torchvision, and the processor checks the class of every part). Images need no video processor, so this
    subclass accepts None for it; `processor(text=..., images=...)` then works as usual.
    """
    from transformers import Qwen2VLProcessor

    global _ImageOnlyQwen2VLProcessor
    if _ImageOnlyQwen2VLProcessor is None:

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            @classmethod
            def get_attributes(cls):
                return [a for a in super().get_attributes() if a != "video_processor"]

        # saved configs must name the real class, so that AutoProcessor (with torchvision) reloads them
        ImageOnlyQwen2VLProcessor.__name__ = ImageOnlyQwen2VLProcessor.__qualname__ = "Qwen2VLProcessor"
        _ImageOnlyQwen2VLProcessor = ImageOnlyQwen2VLProcessor
    proc = _ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template
    )
    proc.video_processor = None
    return proc


_ImageOnlyQwen2VLProcessor = None


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_processor(path: str | Path):
    """`AutoProcessor.from_pretrained(path)` offline; for Qwen2-VL without torchvision, an image-only one."""
    from transformers import AutoProcessor

    path = Path(path)
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as e:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "qwen2_vl" or _torchvision_available():
            raise DemoModelError(f"could not load the processor in {str(path)!r}: {e}") from e
    from transformers import AutoTokenizer

    chat = path / "chat_template.jinja"
    return image_only_qwen2vl_processor(
        _qwen2vl_image_processor(path),
        AutoTokenizer.from_pretrained(path, local_files_only=True),
        chat.read_text() if chat.is_file() else None,
    )


def _qwen2vl_image_processor(path: Path):
    """The PIL-backed Qwen2-VL image processor from a saved folder (some transformers versions refuse
    AutoImageProcessor without torchvision)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except ImportError:
        cfg = json.loads((path / "processor_config.json").read_text())["image_processor"]
        cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
        return transformers.Qwen2VLImageProcessorPil(**cfg)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, processor) from a local folder, offline. Raises `DemoModelError` with a clear message."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    if not path.is_dir():
        raise DemoModelError(f"model folder {str(path)!r} does not exist")
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    if missing or not any(path.glob("*.safetensors")):
        raise DemoModelError(
            f"{str(path)!r} is not a saved model: it needs config.json and *.safetensors "
            "(write one with model.save_pretrained and processor.save_pretrained)"
        )
    try:
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DemoModelError(f"could not load the model in {str(path)!r}: {e}") from e
    return model.to(device).eval(), processor


def demo_model(name: str = "llava", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The embedded demo model `name` ("llava" or "qwen2_vl") as (model, processor), loaded offline.

    Loads in float32 on CPU by default (the checkpoints are stored in fp16).
    """
    path = demo_model_path(name)
    if not (path / "config.json").is_file():
        raise DemoModelError(
            f"the embedded checkpoint {name!r} is missing from {str(path)!r}; reinstall vlm-prune or "
            "rebuild it with `python benchmarks/train_demo_models.py`"
        )
    return load_model(path, dtype=dtype, device=device)


def build_prompt(processor: Any, question: str) -> str:
    """The prompt string for one image followed by `question`, in the processor's chat format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{question} ASSISTANT:"


def normalize_answer(text: str) -> str:
    """First word of a generated answer, lower-cased, without punctuation."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def _device_and_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (AttributeError, StopIteration, TypeError):
        return torch.device(getattr(model, "device", "cpu")), getattr(model, "dtype", torch.float32)


def prepare_inputs(model: Any, processor: Any, images: Sequence, questions: Sequence[str]) -> Any:
    """Left-padded processor inputs for one (image, question) pair each, on the model's device, pixel
    values in the model's dtype (the tokenizer's padding side is restored afterwards)."""
    device, dtype = _device_and_dtype(model)
    prompts = [build_prompt(processor, q) for q in questions]
    tok = getattr(processor, "tokenizer", processor)
    side = getattr(tok, "padding_side", None)
    tok.padding_side = "left"
    try:
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    finally:
        if side is not None:
            tok.padding_side = side
    inputs = inputs.to(device)
    if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, images: Sequence, questions: Sequence[str], max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers (decoded new tokens) of `model` to one (image, question) pair each."""
    inputs = prepare_inputs(model, processor, images, questions)
    tok = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = True,
) -> dict:
    """Exact-match accuracy of greedy answers on mosaic samples, overall and per question type.

    `samples` are `vlm_prune.data.MosaicSample`s (anything with .image, .question, .answer, .qtype).
    Returns {"accuracy", "n", "correct", "cell_accuracy", "cell_n", "per_qtype": {qtype: {"accuracy", "n",
    "correct"}}, "predictions": [normalized answer per sample]}.
    """
    from tqdm.auto import tqdm

    from .data.mosaic import CELL_QTYPES

    samples = list(samples)
    preds: list[str] = []
    bar = tqdm(total=len(samples), desc="evaluate", unit="q", disable=not progress, leave=False)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        answers = generate_answers(
            model, processor, [s.image for s in chunk], [s.question for s in chunk], max_new_tokens
        )
        preds.extend(normalize_answer(a) for a in answers)
        bar.update(len(chunk))
    bar.close()

    def score(idx: list[int]) -> dict:
        correct = sum(preds[i] == normalize_answer(samples[i].answer) for i in idx)
        return {"accuracy": correct / len(idx) if idx else float("nan"), "n": len(idx), "correct": correct}

    all_idx = list(range(len(samples)))
    per = {}
    for q in dict.fromkeys(s.qtype for s in samples):
        per[q] = score([i for i in all_idx if samples[i].qtype == q])
    overall = score(all_idx)
    cell = score([i for i in all_idx if samples[i].qtype in CELL_QTYPES])
    return {
        "accuracy": overall["accuracy"],
        "n": overall["n"],
        "correct": overall["correct"],
        "cell_accuracy": cell["accuracy"],
        "cell_n": cell["n"],
        "per_qtype": per,
        "predictions": preds,
    }

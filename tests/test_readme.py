"""The README's python examples run as written on the embedded demo models, with no warning from transformers.

The only edits: the hub id becomes the local folder of an embedded model and "photo.jpg" a saved test mosaic.
Every warning transformers logs (including its `warning_once` deprecations, whose cache is cleared first) or
raises through `warnings` fails the test.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("easy_vqa")

from vlm_prune import demo  # noqa: E402
from vlm_prune.data import make_mosaics  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = '"llava-hf/llava-1.5-7b-hf"'
PHOTO = '"photo.jpg"'
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\na = 1\n```\n```bash\nx\n```\n```python\nb = 2\n```\n")
    assert blocks == ["a = 1\n", "b = 2\n"]


def test_readme_has_the_examples_this_test_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    assert HUB_ID in blocks[0] and PHOTO in blocks[0], "the usage example changed: update this test's edits"
    assert "torch_dtype" not in "".join(blocks), "torch_dtype= is deprecated in transformers 5: use dtype="


@pytest.mark.parametrize(
    "name",
    [
        "llava",
        pytest.param(
            "qwen2_vl",
            marks=pytest.mark.skipif(
                not HAS_TORCHVISION, reason="AutoProcessor builds Qwen2VLProcessor only with torchvision"
            ),  # fmt: skip
        ),
    ],
)
def test_readme_examples_run_without_transformers_warnings(name, tmp_path):
    import transformers
    from transformers.utils import logging as hf_logging

    photo = tmp_path / "photo.png"
    make_mosaics("test", 1, seed=0)[0].image.save(photo)
    source = "\n".join(python_blocks(README.read_text()))
    source = source.replace(HUB_ID, repr(str(demo.demo_model_path(name)))).replace(PHOTO, repr(str(photo)))
    logger = hf_logging.get_logger("transformers")
    handler = _Collect()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.warning_once.cache_clear()  # a deprecation already warned about earlier in the session counts too
    logger.addHandler(handler)
    namespace: dict = {"__name__": "readme_example"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            exec(compile(source, str(README), "exec"), namespace)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    hf_dir = str(Path(transformers.__file__).parent)
    raised = [f"{w.category.__name__}: {w.message}" for w in caught if str(w.filename).startswith(hf_dir)]
    assert not handler.messages and not raised, handler.messages + raised
    out = namespace["out"]
    assert out.shape[0] == 1 and out.shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert namespace["handle"].stats.visual_tokens_in == 576

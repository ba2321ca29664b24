"""The wheel builds and carries the package (and nothing top-level that would shadow other projects)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("vlm_prune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "__init__.py",
        "api.py",
        "engine/handle.py",
        "adapters/llava.py",
        "adapters/qwen_vl.py",
        "kernels/gather.py",
        "methods/registry.py",
        "bench_schema.json",
        *(f"demo_models/{model}/{file}" for model in ("llava", "qwen2_vl")
          for file in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")),
    ):  # fmt: skip
        assert f"vlm_prune/{module}" in names, module
    top_level = {name.split("/")[0] for name in names}
    assert not {"adapters", "kernels", "tests", "benchmarks"} & top_level
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Name: vlm-prune" in text and "Provides-Extra: video" in text and "Provides-Extra: flash" in text

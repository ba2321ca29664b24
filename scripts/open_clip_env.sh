#!/usr/bin/env bash
# A separate environment for the open_clip FrameScorer backend tests (tests/test_open_clip.py), next to .venv.
#
# open_clip imports torchvision at module level, and the only torch/torchvision pair on these registries that
# imports together is torch 2.14.1 + torchvision 0.29.1 (torchvision 0.28 next to torch 2.13 installs, then fails at
# import). That pair brings a CUDA build of torch (~5.6 GB with its nvidia wheels; it runs on CPU), so it lives in
# .venv-clip instead of .venv, where a torchvision would break every transformers image processor.
# vlm_prune is installed editable with its core dependencies only (no extras: dev/bench would pull more in).
# Then run: .venv-clip/bin/python -m pytest tests/test_open_clip.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-clip
.venv-clip/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv-clip/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" "open_clip_torch==3.3.0" pytest easy-vqa -e .
.venv-clip/bin/python - <<'PY'
import importlib.util

import open_clip
import torch
import torchvision

import vlm_prune.video.scorers  # noqa: F401

assert importlib.util.find_spec("vlm_prune").origin.startswith(__import__("os").getcwd()), "vlm_prune not from checkout"
print("open_clip env ok: open_clip", open_clip.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)
PY

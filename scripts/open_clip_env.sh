#!/usr/bin/env bash
# A separate environment for the tests that need torchvision: the open_clip FrameScorer backend
# (tests/test_open_clip.py) and the transformers video pipelines (tests/test_video_pipeline.py).
#
# open_clip imports torchvision at module level, and the only torch/torchvision pair on these registries that
# imports together is torch 2.14.1 + torchvision 0.29.1 (torchvision 0.28 next to torch 2.13 installs, then fails at
# import). That pair brings a CUDA build of torch (~5.6 GB with its nvidia wheels, which it needs to import; it
# runs on CPU), so it cannot live in .venv, where a torchvision would break every transformers image processor.
#
# The environment is built once per machine under ~/.cache/vlm_prune (keyed by its pins and vlm_prune's core
# dependencies) and linked as .venv-clip, so a fresh clone reuses it. vlm_prune itself is NOT installed there (no
# extras pulled in): run from the repository root, `python -m pytest` imports it from the checkout.
# Then run: .venv-clip/bin/python -m pytest tests/test_open_clip.py tests/test_video_pipeline.py
set -euo pipefail
cd "$(dirname "$0")/.."
pins=("torch==2.14.1" "torchvision==0.29.1" "open_clip_torch==3.3.0" "pytest" "easy-vqa")
core=$(python3 -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")
key=$(printf '%s ' "${pins[@]}" "$core" "$(python3 --version)" | sha256sum | cut -c1-12)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/vlm_prune/venv-clip-$key"
if [ ! -f "$venv/.complete" ]; then  # written after a finished install (an interrupted one is rebuilt)
  echo "building $venv (torch 2.14.1 + torchvision 0.29.1 + open_clip: ~5.6 GB, several minutes the first time)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q "${pins[@]}" $core
  touch "$venv/.complete"
fi
if [ -e .venv-clip ] && [ ! -L .venv-clip ]; then rm -rf .venv-clip; fi
ln -sfn "$venv" .venv-clip
.venv-clip/bin/python - <<'PY'
import os

import open_clip
import torch
import torchvision

import vlm_prune.video.scorers  # noqa: F401  (from the checkout)

assert vlm_prune.__file__.startswith(os.getcwd()), f"vlm_prune imported from {vlm_prune.__file__}, not the checkout"
print("open_clip env ok: open_clip", open_clip.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)
PY

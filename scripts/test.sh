#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check vlm_prune tests benchmarks
.venv/bin/python -m pytest -n 2 --durations=15 "$@"

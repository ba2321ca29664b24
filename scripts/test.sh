#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. This is what CI runs.
# The lmms-eval plugin tests run in their own environment (.venv-lmms, see scripts/lmms_eval_env.sh): lmms-eval's
# own dependencies would replace the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check vlm_prune tests benchmarks
.venv/bin/python -m pytest -n 2 --durations=15 --ignore=tests/test_lmms_eval.py "$@"
bash scripts/lmms_eval_env.sh
.venv-lmms/bin/python -m pytest -p no:cacheprovider tests/test_lmms_eval.py

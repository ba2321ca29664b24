#!/usr/bin/env bash
# Create .venv and install vlm_prune with the given extras (default: dev). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch: on this project's machines it comes from local disk; elsewhere from PyPI.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[${extras}]"

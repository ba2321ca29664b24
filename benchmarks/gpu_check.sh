#!/usr/bin/env bash
# One script for a lent GPU (e.g. an H200 with python3, torch and transformers preinstalled, no internet):
#   (a) benchmarks/speed.py on CUDA in bfloat16, both bench models (~100M parameters, 576 visual tokens);
#   (b) benchmarks/gpu_check.py: identity (keep-all == unwrapped) and batch (row == row alone) checks on
#       CUDA under sdpa and eager in float32, every toy family + the bench models;
#   (c) the same under flash_attention_2 in bfloat16, only if `flash_attn` imports (else it says so), and
#       under SDPA's own flash backend (sdpa_kernel(FLASH_ATTENTION)) in bfloat16, which needs no package;
#       then the sync bound: torch.cuda.set_sync_debug_mode("warn") inside the handle's hooks around a pruned
#       prefill and decode step (one read of the inputs + one per stage, none per step) -> in gpu_check.md;
#   (d) benchmarks/kernels_gpu.py: the fused Triton compaction kernels bit-equal to the torch reference on CUDA,
#       then both timed (B=8, L=3000, D=4096 bf16; 32 layers of KV) -> kernels_gpu.{md,json}, kernels_gpu.log;
#   (e) gpu_check.py --prefill: prefill speedup, FLOPs ideal, same-length ceiling and engine overhead on a
#       compute-bound random LLaVA with a 1.1B Llama LLM, bf16, 576 and 2880 visual tokens, CUDA events
#       -> prefill_timing.json, prefill.log.
# Everything lands in $OUT (default benchmarks/results/tmp/gpu_check): env.txt, speed_cuda.{md,json,png},
# speed_cuda_profile.txt, speed.log, gpu_check.{md,json,log}. Budget: under 8 minutes on an H200 (time limits
# 120 s + 120 s + 60 s + 120 s; each part writes its results as it goes, so a cut-short part still reports).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --device cpu --quick  # smoke test of the script itself on CPU (tiny models)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-benchmarks/results/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
started=$(date +%s)

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(uname -a)"
  echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p'), $(nproc) logical CPUs"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified tracked files"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__)'
  "$PY" -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' 2>&1 | tail -1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

speed_args=(--device "$DEVICE" --out "$OUT/speed_$DEVICE.md")
if [ "$DEVICE" = cuda ]; then speed_args+=(--dtype bfloat16); fi
if [ "$QUICK" = 1 ]; then
  speed_args+=(--quick)
  if [ "$DEVICE" = cpu ]; then speed_args+=(--size tiny); fi
fi
check_args=(--device "$DEVICE" --out "$OUT")
# time limits: the GPU budget is tight (whole script < 4 min); a shared CPU only needs to finish
if [ "$DEVICE" = cuda ]; then SPEED_LIMIT=120; CHECK_LIMIT=120; else SPEED_LIMIT=1800; CHECK_LIMIT=1800; fi
if [ "$QUICK" = 1 ]; then check_args+=(--quick); fi

echo "== (a) speed: $PY benchmarks/speed.py ${speed_args[*]}"
timeout $SPEED_LIMIT "$PY" benchmarks/speed.py "${speed_args[@]}" 2>&1 | tee "$OUT/speed.log"
speed_rc=${PIPESTATUS[0]}

echo "== (b, c) equivalence: $PY benchmarks/gpu_check.py ${check_args[*]}"
timeout $CHECK_LIMIT "$PY" benchmarks/gpu_check.py "${check_args[@]}" 2>&1 | tee "$OUT/gpu_check.log"
check_rc=${PIPESTATUS[0]}

kernel_args=(--device "$DEVICE" --out "$OUT")
if [ "$QUICK" = 1 ]; then kernel_args+=(--quick); fi
if [ "$DEVICE" = cuda ]; then KERNEL_LIMIT=60; else KERNEL_LIMIT=600; fi
echo "== (d) kernels: $PY benchmarks/kernels_gpu.py ${kernel_args[*]}"
timeout $KERNEL_LIMIT "$PY" benchmarks/kernels_gpu.py "${kernel_args[@]}" 2>&1 | tee "$OUT/kernels_gpu.log"
kernel_rc=${PIPESTATUS[0]}

prefill_args=(--device "$DEVICE" --out "$OUT" --prefill)
if [ "$QUICK" = 1 ]; then prefill_args+=(--quick); fi
if [ "$DEVICE" = cuda ]; then PREFILL_LIMIT=120; else PREFILL_LIMIT=600; fi
echo "== (e) prefill timing: $PY benchmarks/gpu_check.py ${prefill_args[*]}"
timeout $PREFILL_LIMIT "$PY" benchmarks/gpu_check.py "${prefill_args[@]}" 2>&1 | tee "$OUT/prefill.log"
prefill_rc=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - started )) s: speed exit $speed_rc, checks exit $check_rc, kernels exit $kernel_rc, prefill exit $prefill_rc (124 = timed out); files in $OUT:"
ls -l "$OUT"
[ "$speed_rc" = 0 ] && [ "$check_rc" = 0 ] && [ "$kernel_rc" = 0 ] && [ "$prefill_rc" = 0 ]

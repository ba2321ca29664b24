"""Fused Triton compaction kernels against the unfused torch reference, on CUDA (run by `benchmarks/gpu_check.sh`).

Two operations at the issue's realistic shapes (defaults; every one is a flag):

* **compact** -- `vlm_prune.kernels.compact_sequence`: hidden states (B=8, L=3000, D=4096) bf16 -> each row's
  kept slots (ragged: about a quarter of the 2880 visual tokens plus the 120 text tokens, a different count per
  row), with the kept columns, the 2-D mask (64 cached columns) and 3-row M-RoPE positions, in one launch;
  the reference is the engine's former chain (one `torch.gather` per tensor, `masked_fill`, `cat`).
* **trim** -- `vlm_prune.kernels.trim_layers`: the keys and values of 32 layers (B=8, H=8 KV heads, S=3000,
  d=128) bf16 -> the kept slots, one launch; the reference gathers the 64 tensors one by one.

First both backends are checked bit-equal on these inputs (a mismatch fails the script), then each is timed:
`device ms` from CUDA events around the call (median of --repeat after --warmup), `host ms` the Python time of
the call itself (what the engine's hook spends before the GPU can run ahead), and the bandwidth it reaches
(bytes read + written / device time). Writes kernels_gpu.{md,json} to --out.

    PYTHONPATH=. python3 benchmarks/kernels_gpu.py --device cuda
    PYTHONPATH=. python3 benchmarks/kernels_gpu.py --device cpu --quick   # smoke test: torch reference only
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vlm_prune.kernels import compact_sequence, trim_layers, triton_available  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def ragged_keep(generator: torch.Generator, batch: int, length: int, visual: int, keep: float) -> torch.Tensor:
    """(B, L') left-padded kept slots: every text slot, and round(keep * visual) +- 10 % visual slots per row."""
    text = torch.arange(visual, length)
    rows = []
    for _ in range(batch):
        count = max(1, min(visual, round(keep * visual * (0.9 + 0.2 * float(torch.rand(1, generator=generator))))))
        visual_kept = torch.randperm(visual, generator=generator)[:count].sort().values
        rows.append(torch.cat([visual_kept, text]))
    width = max(len(r) for r in rows)
    index = torch.full((batch, width), -1, dtype=torch.long)
    for row, kept in enumerate(rows):
        index[row, width - len(kept) :] = kept
    return index


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    kind = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(kind), b.contiguous().view(kind))


def time_call(fn, device: torch.device, warmup: int, repeat: int) -> tuple[float, float]:
    """(median device ms, median host ms) of fn()."""
    for _ in range(warmup):
        fn()
    device_ms, host_ms = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - began) * 1e3)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            device_ms.append(start.elapsed_time(end))
        else:
            device_ms.append(host_ms[-1])
    return statistics.median(device_ms), statistics.median(host_ms)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=3000)
    parser.add_argument("--visual", type=int, default=2880)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test of the script)")
    parser.add_argument("--out", default="benchmarks/results/tmp/gpu_check")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.visual, args.dim, args.layers, args.repeat = 2, 96, 80, 64, 2, 3
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    use_triton = device.type == "cuda" and triton_available()
    generator = torch.Generator().manual_seed(0)

    index = ragged_keep(generator, args.batch, args.length, args.visual, args.keep).to(device)
    on_device = torch.Generator(device=device).manual_seed(1)  # gigabytes of caches: draw them where they live
    hidden = torch.randn(args.batch, args.length, args.dim, generator=on_device, device=device, dtype=dtype)
    past = 64
    columns = torch.arange(args.length).expand(args.batch, -1).contiguous().to(device)
    mask = torch.ones(args.batch, past + args.length, dtype=torch.long, device=device)
    rope = torch.arange(args.length).view(1, 1, -1).expand(3, args.batch, -1).contiguous().to(device)
    shape = (args.batch, args.kv_heads, args.length, args.head_dim)
    caches = [torch.randn(shape, generator=on_device, device=device, dtype=dtype) for _ in range(2 * args.layers)]

    def compact(backend: str):
        return compact_sequence(hidden, index, columns=columns, mask=mask, rope=rope, backend=backend)

    def trim(backend: str):
        return trim_layers(caches, index, backend=backend)

    kept = compact("torch")
    trimmed = trim("torch")
    compact_bytes = nbytes(*kept) + nbytes(*kept)  # read what is kept (about), write it
    trim_bytes = 2 * nbytes(*trimmed)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if triton_available() else None,
        "dtype": args.dtype,
        "shapes": {
            "compact": f"hidden ({args.batch}, {args.length}, {args.dim}) -> ({args.batch}, {index.shape[1]}, "
            f"{args.dim}), mask (B, {past} + L), rope (3, B, L)",
            "trim": f"{2 * args.layers} x {shape} -> S' = {index.shape[1]}",
        },
        "rows": [],
        "bit_equal": {},
    }
    ok = True
    if use_triton:
        results["bit_equal"]["compact"] = all(same_bits(a, b) for a, b in zip(compact("triton"), kept))
        results["bit_equal"]["trim"] = all(same_bits(a, b) for a, b in zip(trim("triton"), trimmed))
        ok = all(results["bit_equal"].values())
        print("bit-equal to the torch reference:", results["bit_equal"], flush=True)
    del kept, trimmed
    for name, fn, moved in (("compact", compact, compact_bytes), ("trim", trim, trim_bytes)):
        for backend in ("torch", "triton") if use_triton else ("torch",):
            device_ms, host_ms = time_call(functools.partial(fn, backend), device, args.warmup, args.repeat)
            row = {"op": name, "backend": backend, "device_ms": device_ms, "host_ms": host_ms}
            row["GB_per_s"] = moved / device_ms / 1e6
            results["rows"].append(row)
            print(f"{name:8s} {backend:7s} device {device_ms:8.3f} ms  host {host_ms:7.3f} ms  "
                  f"{row['GB_per_s']:8.1f} GB/s", flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Compaction kernels: fused Triton vs torch reference ({results['device']}, {args.dtype})",
        "",
        f"torch {results['torch']}, triton {results['triton']}; " + "; ".join(results["shapes"].values()),
        "",
        f"Bit-equal on these inputs: {results['bit_equal'] or 'not checked (no CUDA + Triton)'}",
        "",
        "| op | backend | device ms | host ms | GB/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        numbers = f"{row['device_ms']:.3f} | {row['host_ms']:.3f} | {row['GB_per_s']:.1f}"
        cells = [row["op"], row["backend"], numbers]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "kernels_gpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'kernels_gpu.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

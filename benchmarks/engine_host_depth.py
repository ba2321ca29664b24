"""Engine host time against the depth of the language model: the tiny LLaVA with 4 and with 32 decoder layers.

`engine_host_time.py` measures the 4-layer tiny models. Two costs grow with depth and do not show there:
- an in-LLM stage (FastV) attaches a pre-hook to every decoder layer from its own onwards (`engine/layer_hooks.py`),
  for the prefill, and each of them runs once;
- every hook runs colder, as the model's own work between the hooks grows (`cold_host_ops.md`).
Same measurement as the headline benchmark (`engine_host_time.measure`: hooks minus the methods' `select`,
`time.thread_time`, medians over generate() calls; "excl. device ops" without the gathers, cache trim and 4-D mask).

    python benchmarks/engine_host_depth.py                      # writes benchmarks/results/engine_host_depth.md
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from engine_host_time import measure  # next to this script
from speed import cpu_model
from tqdm import tqdm

from vlm_prune.toy_models import _classes, build_config, make_inputs


def tiny_llava(layers: int):
    """The tiny LLaVA of `toy_models` with `layers` decoder layers (random weights, seed 0)."""
    config = build_config("llava", "tiny")
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    return _classes("llava")[1](config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,32", help="comma-separated decoder-layer counts")
    parser.add_argument("--repeats", type=int, default=15, help="generate() calls per cell")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_host_depth.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [("random", {"keep": 0.25}), ("fastv", {"keep": 0.25})]
    depths = [int(d) for d in args.depths.split(",")]
    lines = [
        "# Engine host time against the language model's depth (tiny LLaVA, 4 and 32 decoder layers)",
        "",
        f"`python benchmarks/engine_host_depth.py` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {cpu_model()}, "
        f"{platform.machine()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f}; torch "
        f"{torch.__version__}; 1 thread; {args.repeats} generate() calls per cell; keep 0.25, FastV at layer 2).",
        "",
        "| layers | batch | method | prefill ms | prefill excl. device ops ms | decode step ms |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    progress = tqdm(total=len(depths) * 2 * len(configs), desc="cells")
    for layers in depths:
        model = tiny_llava(layers)
        for batch in (1, 8):
            inputs = make_inputs(model, batch=batch)
            for name, options in configs:
                row = measure(model, inputs, name, options, args.repeats)
                lines.append(f"| {layers} | {batch} | {name} | {row['prefill_ms']:.3f} | {row['prefill_host_ms']:.3f} "
                             f"| {row['decode_ms']:.4f} |")
                progress.update()
    progress.close()
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

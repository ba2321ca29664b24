"""Prefill speedup of the pre-LLM baselines measured the way `generate()` runs the prefill.

`generate()` calls the first forward with `logits_to_keep=1` (only the last position goes through the
LM head) after encoding the media once. `benchmarks/speed.py` times a plain forward, whose LM head covers
every position; this script times the generate-like prefill, so its ratio compares with the FLOPs ideal
of the decoder layers.

    python benchmarks/prefill_as_generate.py --out benchmarks/results/prefill_as_generate_cpu.md

Method: ~100M-parameter random models from `vlm_prune.toy_models` (576 visual tokens), batch 1,
1 torch thread, media features encoded once and passed as `mm_encoder_outputs` (as generate() does),
`--rounds` rounds after one warm-up round; in each round the unwrapped model and every configuration run
back to back, and the speedup is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import vlm_prune
from vlm_prune.toy_models import build_tiny, make_inputs

METHODS = ("random", "pool", "divprune")


def encoded_inputs(model, family: str) -> dict:
    """Inputs with the media encoded once, as generate() passes them to the prefill."""
    inputs = make_inputs(model)
    with torch.no_grad():
        if family == "llava":
            image = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        else:
            image = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
            )
    prepared = {key: value for key, value in inputs.items() if key not in ("pixel_values",)}
    prepared["mm_encoder_outputs"] = {"image": image}
    return prepared


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(family: str, keep: float, rounds: int) -> list[dict]:
    model = build_tiny(family, size="bench")
    inputs = encoded_inputs(model, family)

    def prefill():
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)

    results = {name: {"ratios": [], "ms": [], "ideal": None} for name in METHODS}
    base_ms = []
    for round_index in range(rounds + 1):
        base = timed(prefill)
        for name in METHODS:
            with vlm_prune.pruned(model, name, keep=keep) as handle:
                pruned = timed(prefill)
                results[name]["ideal"] = 1.0 / handle.stats.flops_ratio
            if round_index:  # round 0 warms up
                results[name]["ratios"].append(base / pruned)
                results[name]["ms"].append(pruned * 1e3)
        if round_index:
            base_ms.append(base * 1e3)
    rows = []
    for name, result in results.items():
        speedup = statistics.median(result["ratios"])
        rows.append(
            {
                "model": family,
                "method": name,
                "keep": keep,
                "unpruned_ms": statistics.median(base_ms),
                "pruned_ms": statistics.median(result["ms"]),
                "speedup": speedup,
                "ideal": result["ideal"],
                "achieved": speedup / result["ideal"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llava,qwen2_vl", help="comma-separated toy families")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_as_generate_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for family in args.models.split(",") for row in run(family, args.keep, args.rounds)]
    lines = [
        "# Pre-LLM prefill speedup, timed as generate() runs the prefill",
        "",
        f"- date {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, 1 torch thread; load average {os.getloadavg()[0]:.2f}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}; "
        "`python benchmarks/prefill_as_generate.py`",
        "- forward with `logits_to_keep=1` and the media encoded once (`mm_encoder_outputs`), batch 1; "
        f"{args.rounds} rounds after a warm-up, speedup = median of per-round paired ratios; "
        "ideal = unpruned / pruned decoder FLOPs (`handle.stats`)",
        "",
        "| model | method | keep | unpruned ms | pruned ms | speedup | FLOPs-ideal | achieved/ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['keep']} | {row['unpruned_ms']:.0f} | {row['pruned_ms']:.0f} | "
            f"{row['speedup']:.2f}x | {row['ideal']:.2f}x | {row['achieved']:.0%} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Prefill speedup of the pre-LLM baselines measured the way `generate()` runs the prefill.

`generate()` calls the first forward with `logits_to_keep=1` (only the last position goes through the
LM head) after encoding the media once. `benchmarks/speed.py` times a plain forward, whose LM head covers
every position; this script times the generate-like prefill, so its ratio compares with the FLOPs ideal
of the decoder layers.

    python benchmarks/prefill_as_generate.py --out benchmarks/results/prefill_as_generate_cpu.md

Method: ~100M-parameter random models from `vlm_prune.toy_models` (576 visual tokens), batch 1,
1 torch thread, media features encoded once and passed as `mm_encoder_outputs` (as generate() does),
`--rounds` rounds after one warm-up round; in each round the unwrapped model and every configuration run
back to back (the unwrapped one included, in an order rotated each round, so drifting load hits all
alike), and the speedup is
the median of the per-round ratios.

Also measured, the same way:
* the engine's own cost at keep 1.0: methods that keep every visual token, at layer 0 (the pre-LLM
  path: hooks, gather, mask, positions) and at layer 2 (every later layer hooked), as the median
  per-round overhead over the unwrapped model, with its interquartile range;
* the hardware ceiling: the unwrapped model on a text-only input exactly as long as the pruned
  sequence. Its speedup is the best any pruning can reach on this machine at that length;
* where the ceiling falls short of the FLOPs ideal: the torch profiler's self time of the unwrapped
  prefill at full and at pruned length, split into matrix products, the attention kernel and everything
  else, each class's time ratio beside its FLOP ratio; and the ideal recomputed with causal attention
  FLOPs (the lower triangle a causal kernel computes, n(n+1)/2 query-key pairs) instead of the full n^2
  square that FastV's formula, and so `handle.stats`, counts.
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
from torch.profiler import ProfilerActivity, profile

import vlm_prune
from vlm_prune.engine.stats import LayerShape
from vlm_prune.toy_models import build_tiny, make_inputs

METHODS = ("random", "pool", "divprune")
KEEP_ALL_LAYERS = (0, 2)


def verdict(row: dict) -> str:
    """<= 2 % on the median and on the best-of ratio; undecided when they disagree (timing noise)."""
    median_ok, best_ok = row["overhead"] <= 0.02, row["best_of"] <= 0.02
    if median_ok and best_ok:
        return "met"
    if not median_ok and not best_ok:
        return "**not met**"
    return f"undecided (IQR {row['q1']:+.1%} to {row['q3']:+.1%})"


def speed_verdict(row: dict) -> str:
    """>= 90 % of the FLOPs ideal on the median and on the best-of speedup; undecided when they disagree."""
    median_ok, best_ok = row["achieved"] >= 0.9, row["best_of"] / row["ideal"] >= 0.9
    if median_ok and best_ok:
        return "met"
    if not median_ok and not best_ok:
        return "**not met**"
    return "undecided (median and best-of disagree)"


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def encoded_inputs(model, family: str) -> dict:
    """Inputs with the media encoded once, as generate() passes them to the prefill."""
    inputs = make_inputs(model)
    with torch.no_grad():
        if family == "llava":
            image = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        else:
            image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    prepared = {key: value for key, value in inputs.items() if key not in ("pixel_values",)}
    prepared["mm_encoder_outputs"] = {"image": image}
    return prepared


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


OP_CLASSES = ("matrix products", "attention kernel", "everything else")


def op_class(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "matrix products"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention kernel"
    return "everything else"


def profiled_ms(prefill, batch: dict) -> dict[str, float]:
    """Self CPU time (ms) per op class of one profiled prefill."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prefill(batch)
    totals = dict.fromkeys(OP_CLASSES, 0.0)
    for event in prof.key_averages():
        totals[op_class(event.key)] += event.self_cpu_time_total / 1e3
    return totals


def causal_layer_flops(shape: LayerShape, n: int) -> int:
    """`LayerShape.layer_flops` with the n(n+1)/2 query-key pairs of a causal prefill instead of n^2."""
    return shape.layer_flops(n) - 2 * (2 * n * n * shape.q_width) + 2 * (n * (n + 1) * shape.q_width)


def breakdown(model, prefill, inputs: dict, ceiling_inputs: dict, repeats: int = 7) -> dict:
    """Per op class: ms at full and at pruned length, the time ratio and the FLOP ratio of that class.

    Full and pruned length are profiled in alternation, `repeats` pairs; the time ratio is the median of the
    per-pair ratios, so drifting load hits both sides of each ratio alike.
    """
    full_length, short_length = int(inputs["input_ids"].shape[1]), int(ceiling_inputs["input_ids"].shape[1])
    shape = LayerShape.from_config(model.config.get_text_config())
    pairs = [(profiled_ms(prefill, inputs), profiled_ms(prefill, ceiling_inputs)) for _ in range(repeats)]
    flop_ratio = {
        "matrix products": full_length / short_length,
        "attention kernel": (full_length * (full_length + 1)) / (short_length * (short_length + 1)),
        "everything else": full_length / short_length,
    }
    return {
        "full_length": full_length,
        "short_length": short_length,
        "fastv_ideal": shape.layer_flops(full_length) / shape.layer_flops(short_length),
        "causal_ideal": causal_layer_flops(shape, full_length) / causal_layer_flops(shape, short_length),
        "classes": [
            {
                "class": name,
                "full_ms": statistics.median(full[name] for full, _ in pairs),
                "short_ms": statistics.median(short[name] for _, short in pairs),
                "time_ratio": statistics.median(full[name] / short[name] for full, short in pairs),
                "flop_ratio": flop_ratio[name],
            }
            for name in OP_CLASSES
        ],
    }


def run(family: str, keep: float, rounds: int) -> tuple[list[dict], list[dict], dict]:
    """(speedup rows, engine-cost rows, op-class breakdown) for one toy family."""
    from speed import keep_all_at, same_length_inputs  # benchmarks/speed.py, next to this script

    model = build_tiny(family, size="bench")
    inputs = encoded_inputs(model, family)
    with torch.no_grad():
        ceiling_inputs = same_length_inputs(model, make_inputs(model), [keep])[keep]

    def prefill(batch: dict = inputs) -> None:
        with torch.no_grad():
            model(**batch, use_cache=True, logits_to_keep=1)

    def pruned_run(method, keep_value):
        def go() -> float:
            with vlm_prune.pruned(model, method, keep=keep_value) as handle:
                seconds = timed(prefill)
                ideal[key_of(method)] = 1.0 / handle.stats.flops_ratio
            return seconds

        return go

    key_of = lambda method: method if isinstance(method, str) else f"keep-all@L{method.layer}"  # noqa: E731
    ideal: dict[str, float] = {}
    configs = {name: pruned_run(name, keep) for name in METHODS}
    configs.update({f"keep-all@L{layer}": pruned_run(keep_all_at(layer), None) for layer in KEEP_ALL_LAYERS})
    configs["same-length unwrapped"] = lambda: timed(lambda: prefill(ceiling_inputs))
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    ms: dict[str, list[float]] = {name: [] for name in configs}
    base_ms = []
    configs["unwrapped"] = lambda: timed(prefill)
    names = list(configs)
    for round_index in range(rounds + 1):
        shift = round_index % len(names)
        seconds = {name: configs[name]() for name in names[shift:] + names[:shift]}
        if round_index:  # round 0 warms up
            base = seconds.pop("unwrapped")
            base_ms.append(base * 1e3)
            for name, value in seconds.items():
                ratios[name].append(base / value)
                ms[name].append(value * 1e3)
    rows, engine = [], []
    ceiling = statistics.median(ratios["same-length unwrapped"])
    for name in METHODS:
        speedup = statistics.median(ratios[name])
        rows.append(
            {
                "model": family,
                "method": name,
                "keep": keep,
                "unpruned_ms": statistics.median(base_ms),
                "pruned_ms": statistics.median(ms[name]),
                "speedup": speedup,
                "ideal": ideal[name],
                "achieved": speedup / ideal[name],
                "ceiling": ceiling,
                "best_of": min(base_ms) / min(ms[name]),
            }
        )
    for layer in KEEP_ALL_LAYERS:
        name = f"keep-all@L{layer}"
        overheads = [1.0 / r - 1.0 for r in ratios[name]]
        low, high = quartiles(overheads)
        engine.append(
            {"model": family, "config": name, "unpruned_ms": statistics.median(base_ms),
             "wrapped_ms": statistics.median(ms[name]), "overhead": statistics.median(overheads),
             "q1": low, "q3": high, "best_of": min(ms[name]) / min(base_ms) - 1.0}
        )  # fmt: skip
    return rows, engine, {"model": family, **breakdown(model, prefill, inputs, ceiling_inputs)}


def render_breakdown(breakdowns: list[dict], rows: list[dict]) -> list[str]:
    """Markdown: where the unwrapped model's own speedup at the pruned length falls short of the ideal."""
    lines = [
        "",
        "Where the hardware ceiling falls short of the FLOPs ideal: self CPU time of the unwrapped prefill by op "
        "class (torch profiler; 7 alternating pairs of profiled runs, medians, the time ratio as the median of "
        "per-pair ratios; profiling adds a little per-op time), at the full "
        "length and at the pruned length, with each class's time ratio beside its FLOP ratio (tokens for "
        "products and element-wise work, query-key pairs for attention). The FLOPs ideal of the target counts "
        "attention over the full n^2 square (FastV's formula, `handle.stats`); a causal kernel computes the "
        "lower triangle, so the causal ideal is what a machine running every op at the same speed at both "
        "lengths would give.",
        "",
        "| model | length | op class | ms at full length | ms at pruned length | time ratio | FLOP ratio "
        "| speed kept |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for item in breakdowns:
        for entry in item["classes"]:
            ratio = entry["time_ratio"]
            lines.append(
                f"| {item['model']} | {item['full_length']} -> {item['short_length']} | {entry['class']} | "
                f"{entry['full_ms']:.0f} | {entry['short_ms']:.0f} | {ratio:.2f}x | {entry['flop_ratio']:.2f}x | "
                f"{ratio / entry['flop_ratio']:.0%} |"
            )
    lines += [
        "",
        "| model | FLOPs ideal (FastV, the target's) | causal-attention ideal | ceiling measured | engine's best "
        "method / ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    for item in breakdowns:
        own = [row for row in rows if row["model"] == item["model"]]
        ceiling = own[0]["ceiling"]
        best = max(own, key=lambda row: row["speedup"])
        lines.append(
            f"| {item['model']} | {item['fastv_ideal']:.2f}x | {item['causal_ideal']:.2f}x "
            f"({item['causal_ideal'] / item['fastv_ideal']:.0%} of FastV's) | {ceiling:.2f}x "
            f"({ceiling / item['fastv_ideal']:.0%}) | {best['method']} {best['speedup']:.2f}x "
            f"({best['speedup'] / ceiling:.0%}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llava,qwen2_vl", help="comma-separated toy families")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up (default 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_as_generate_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    rows, engine, breakdowns = [], [], []
    for family in args.models.split(","):
        family_rows, family_engine, family_breakdown = run(family, args.keep, args.rounds)
        rows += family_rows
        engine += family_engine
        breakdowns.append(family_breakdown)
    load_end = os.getloadavg()
    lines = [
        "# Pre-LLM prefill speedup, timed as generate() runs the prefill",
        "",
        f"- date {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, 1 torch thread; load average (1, 5, 15 min) at start "
        f"{', '.join(f'{v:.2f}' for v in load_start)}, at end {', '.join(f'{v:.2f}' for v in load_end)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}; "
        "`python benchmarks/prefill_as_generate.py`",
        "- forward with `logits_to_keep=1` and the media encoded once (`mm_encoder_outputs`), batch 1; "
        f"{args.rounds} rounds after a warm-up, speedup = median of per-round paired ratios; "
        "ideal = unpruned / pruned decoder FLOPs (`handle.stats`)",
        "",
        "- ceiling = the unwrapped model on a text-only input as long as the pruned sequence (no engine, no "
        "selection): the speedup this hardware gives at that length",
        "",
        "| model | method | keep | unpruned ms | pruned ms | speedup | FLOPs-ideal | achieved/ideal | best-of speedup "
        "(/ideal) | ceiling (/ideal) | speedup / ceiling | target >= 90 % of ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['keep']} | {row['unpruned_ms']:.0f} | {row['pruned_ms']:.0f} | "
            f"{row['speedup']:.2f}x | {row['ideal']:.2f}x | {row['achieved']:.0%} | {row['best_of']:.2f}x "
            f"({row['best_of'] / row['ideal']:.0%}) | {row['ceiling']:.2f}x ({row['ceiling'] / row['ideal']:.0%}) | "
            f"{row['speedup'] / row['ceiling']:.0%} | "
            f"{speed_verdict(row)} |"
        )
    lines += [
        "",
        "Engine cost at keep 1.0 (every visual token kept; median per-round overhead over the unwrapped "
        "model, interquartile range in brackets; best-of = fastest wrapped run / fastest unwrapped run, the "
        "statistic least touched by other load on a shared machine):",
        "",
        "| model | configuration | unpruned ms | wrapped ms | overhead [IQR] | best-of overhead | target <= 2 % |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in engine:
        lines.append(
            f"| {row['model']} | {row['config']} | {row['unpruned_ms']:.0f} | {row['wrapped_ms']:.0f} | "
            f"{row['overhead']:+.2%} [{row['q1']:+.2%}, {row['q3']:+.2%}] | {row['best_of']:+.2%} | "
            f"{verdict(row)} |"
        )
    lines += render_breakdown(breakdowns, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

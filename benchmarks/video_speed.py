"""EVS on a ~100M-parameter random Qwen2-VL with a 16-frame video: selection cost and prefill speedup.

    python benchmarks/video_speed.py --out benchmarks/results/video_speed_cpu.md

Setup: `vlm_prune.toy_models.build_tiny("qwen2_vl", size="bench")` (12 decoder layers, hidden 768), one video of
16 frames at 336x336 px (video_grid_thw (8, 24, 24): 8 temporal steps x 12 x 12 merged tokens = 1152 video
tokens), batch 1, 1 torch thread. The video is encoded once and passed as `mm_encoder_outputs`, and the prefill
runs as generate() runs it (`logits_to_keep=1`), so the timings are the LLM prefill the pruning acts on.

Per round (after one warm-up round), in an order rotated each round so that drifting load hits all alike:
* the unwrapped prefill;
* EVS at rate 0.75 (keep 0.25) and at rate 0.5, and random at the same counts (no scoring: the engine alone);
* the same-length ceiling: the unwrapped model on a text-only input exactly as long as EVS's pruned sequence,
  the best any pruning can reach on this machine at that length.
Reported: median per-round speedup, speedup / ceiling (target >= 95 % at rate 0.75), and EVS's selection time
(`handle.stats.select_seconds`) as a share of the pruned prefill and of the unpruned one (target <= 1 %).

Targets are measured here, never in unit tests. Random weights make EVS's choice meaningless for accuracy,
but its cost (a cosine per token and one sort over the video) does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_prune  # noqa: E402
from vlm_prune.methods.evs import retained_count  # noqa: E402
from vlm_prune.toy_models import build_tiny, make_inputs  # noqa: E402

VIDEO_GRID = (8, 24, 24)  # 16 frames (temporal patch 2), 336 px with patch 14


def encoded_video_inputs(model) -> dict:
    """One video, encoded once and handed to the prefill as `mm_encoder_outputs` (as generate() does)."""
    inputs = make_inputs(model, num_images=0, video=True, video_grid=VIDEO_GRID)
    with torch.no_grad():
        video = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        )
    prepared = {key: value for key, value in inputs.items() if key != "pixel_values_videos"}
    prepared["mm_encoder_outputs"] = {"video": video}
    return prepared


def same_length_text(model, length: int) -> dict:
    text = make_inputs(model, num_images=0, prompt_lengths=[length - 1])
    if int(text["input_ids"].shape[1]) != length:
        raise RuntimeError(f"same-length input has {text['input_ids'].shape[1]} tokens, want {length}")
    return text


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rounds: int) -> dict:
    model = build_tiny("qwen2_vl", size="bench")
    inputs = encoded_video_inputs(model)
    length = int(inputs["input_ids"].shape[1])
    video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    t, h, w = VIDEO_GRID

    def prefill(batch: dict = inputs) -> None:
        with torch.no_grad():
            model(**batch, use_cache=True, logits_to_keep=1)

    select: dict[str, list[float]] = {}

    def pruned(name: str, method: str, keep: float):
        def go() -> float:
            with vlm_prune.pruned(model, method, keep=keep) as handle:
                seconds = timed(prefill)
                select.setdefault(name, []).append(handle.stats.select_seconds)
            return seconds

        return go

    configs = {}
    for rate in (0.75, 0.5):
        kept = retained_count((t, h, w), rate, spatial_merge_size=2)
        configs[f"evs rate {rate}"] = pruned(f"evs rate {rate}", "evs", 1 - rate)
        configs[f"random, same count ({rate})"] = pruned(f"random {rate}", "random", kept)
        ceiling = same_length_text(model, length - (video_tokens - kept))
        configs[f"same-length unwrapped ({rate})"] = lambda batch=ceiling: timed(lambda: prefill(batch))
    configs["unwrapped"] = lambda: timed(prefill)
    names = list(configs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):
        shift = round_index % len(names)
        this = {name: configs[name]() for name in names[shift:] + names[:shift]}
        if not round_index:
            select.clear()
            continue
        for name, value in this.items():
            seconds[name].append(value)
            ratios[name].append(this["unwrapped"] / value)
    rows = []
    for rate in (0.75, 0.5):
        kept = retained_count((t, h, w), rate, spatial_merge_size=2)
        evs, ceiling = f"evs rate {rate}", f"same-length unwrapped ({rate})"
        speedup, bound = statistics.median(ratios[evs]), statistics.median(ratios[ceiling])
        select_ms = statistics.median(select[evs]) * 1e3
        rows.append(
            {
                "rate": rate,
                "video_tokens": video_tokens,
                "kept": kept,
                "sequence": length,
                "pruned_sequence": length - (video_tokens - kept),
                "unpruned_ms": statistics.median(seconds["unwrapped"]) * 1e3,
                "evs_ms": statistics.median(seconds[evs]) * 1e3,
                "random_ms": statistics.median(seconds[f"random, same count ({rate})"]) * 1e3,
                "ceiling_ms": statistics.median(seconds[ceiling]) * 1e3,
                "speedup": speedup,
                "random_speedup": statistics.median(ratios[f"random, same count ({rate})"]),
                "ceiling": bound,
                "of_ceiling": speedup / bound,
                "select_ms": select_ms,
                "select_share_of_pruned": select_ms / (statistics.median(seconds[evs]) * 1e3),
                "select_share_of_unpruned": select_ms / (statistics.median(seconds["unwrapped"]) * 1e3),
            }
        )
    return {"rows": rows, "rounds": rounds}


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# EVS on a 16-frame video: selection cost and prefill speedup (CPU)",
        "",
        f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs, {machine['threads']} torch thread), "
        f"load average {machine['load']} at start; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"Python {machine['python']}; {machine['date']}.",
        "",
        "Model: random ~100M-parameter Qwen2-VL (`build_tiny('qwen2_vl', size='bench')`, 12 layers, hidden 768); "
        f"one video, video_grid_thw {VIDEO_GRID} = 16 frames, 8 temporal steps x 12 x 12 tokens; batch 1; the video "
        "encoded once (mm_encoder_outputs), prefill as generate() runs it (logits_to_keep=1). "
        f"Median of {result['rounds']} rounds after one warm-up round, order rotated each round.",
        "",
        "| rate | video tokens kept | sequence | unpruned ms | EVS ms | speedup | same-length ceiling | "
        "of ceiling | random (same count) | EVS select ms | select % of pruned prefill | "
        "select % of unpruned prefill |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rate']} | {r['kept']} / {r['video_tokens']} | {r['pruned_sequence']} / {r['sequence']} | "
            f"{r['unpruned_ms']:.1f} | {r['evs_ms']:.1f} | {r['speedup']:.2f}x | {r['ceiling']:.2f}x | "
            f"{100 * r['of_ceiling']:.1f} % | {r['random_speedup']:.2f}x | {r['select_ms']:.2f} | "
            f"{100 * r['select_share_of_pruned']:.2f} % | {100 * r['select_share_of_unpruned']:.2f} % |"
        )
    main = result["rows"][0]
    lines += [
        "",
        "Targets (issue 9):",
        f"- EVS selection cost <= 1 % of the prefill: {100 * main['select_share_of_pruned']:.2f} % of the pruned "
        f"prefill, {100 * main['select_share_of_unpruned']:.2f} % of the unpruned one "
        f"({'met' if main['select_share_of_pruned'] <= 0.01 else 'not met'}).",
        f"- prefill speedup at rate 0.75 >= 95 % of the same-length ceiling: {100 * main['of_ceiling']:.1f} % "
        f"({'met' if main['of_ceiling'] >= 0.95 else 'not met'}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown report path (a .json is written beside it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from speed import cpu_model  # benchmarks/speed.py

    machine = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    result = {"machine": machine, **run(args.rounds)}
    text = render(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

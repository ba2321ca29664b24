"""A/B of two engine trees' host time in situ (inside generate()), interleaved cell by cell, paired ratios.

`engine_host_time.py` runs every cell of one tree, then the other: on a shared or drifting VM the two runs see
different machines (the same code moved by 20 % within an hour here), and one process's memory layout can make
all of its cells a few percent faster or slower. This tool keeps one worker process per tree alive, asks them for
the same cell in turn (alternating which goes first), and starts fresh workers every round, so that drift and
layout luck fall on both sides alike. Each answer is `--repeats` generate() calls timed exactly as the headline
benchmark times them (hooks minus the methods' `select`, `time.thread_time`); the report gives, per cell, the
median prefill and decode step of each tree and their ratio, then the geometric mean of the ratios per batch.

    python benchmarks/engine_host_ab.py /tmp/before /work/main --rounds 6 --families llava,qwen2_vl
    python benchmarks/engine_host_ab.py OLD NEW --methods fastv --batches 8      # one configuration

OLD and NEW are checkouts (e.g. `git worktree add /tmp/before <rev>`); each worker imports `vlm_prune` and this
directory's helpers from its own tree. It is an A/B tool for the engine code, not the issue's measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ("keep-all@L0", "random", "pool", "divprune", "fastv")


def worker(tree: str) -> None:
    """Answer 'family batch method repeats' lines on stdin with JSON [prefill ms list, decode ms list]."""
    sys.path[:0] = [tree, str(Path(tree) / "benchmarks")]
    import engine_host_time as timing  # (the tree's own copy)
    import torch
    from speed import keep_all_at

    import vlm_prune
    from vlm_prune.toy_models import build_tiny, make_inputs

    if not vlm_prune.__file__.startswith(tree):
        raise SystemExit(f"worker for {tree} imported vlm_prune from {vlm_prune.__file__}")
    torch.set_num_threads(1)
    models: dict = {}
    generate = {"max_new_tokens": timing.STEPS + 1, "min_new_tokens": timing.STEPS + 1, "do_sample": False}
    print("ready", flush=True)
    for line in sys.stdin:
        family, batch, name, repeats = line.split()
        key = (family, int(batch))
        if key not in models:
            model = build_tiny(family)
            models[key] = (model, make_inputs(model, batch=int(batch)))
        model, inputs = models[key]
        method = keep_all_at(0) if name == "keep-all@L0" else name
        options = {} if name == "keep-all@L0" else {"keep": 0.25, **(timing.in_llm_fastv(family) if name == "fastv"
                                                                      else {})}  # fmt: skip
        before = timing._hook_keys(model)
        totals: list[list[float]] = [[0.0], [0.0], [0.0]]  # hooks, selects, device ops (untimed here)
        prefill, decode = [], []
        with vlm_prune.pruned(model, method, **options) as handle, torch.no_grad():
            timing.wrap_new_hooks(model, before, totals[0], handle)
            timing._timed_selects(handle, totals[1])
            for call in range(int(repeats) + 2):  # (two warm-up calls)
                marks: list = []
                timer = timing._per_forward(model, totals, marks)
                try:
                    model.generate(**inputs, **generate)
                finally:
                    timer.remove()
                values = [(hooks - selects) * 1e3 for hooks, selects, _ in timing._splits(marks, totals)]
                if call >= 2:
                    prefill.append(values[0])
                    decode.extend(values[1:])
        print(json.dumps([prefill, decode]), flush=True)


def _start(tree: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--worker", tree], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd="/tmp")  # fmt: skip
    if process.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {tree} did not start")
    return process


def _ask(process: subprocess.Popen, cell: tuple, repeats: int) -> list:
    process.stdin.write(f"{cell[0]} {cell[1]} {cell[2]} {repeats}\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", nargs="?", help="checkout of the engine to compare against")
    parser.add_argument("new", nargs="?", help="checkout of the engine under test")
    parser.add_argument("--rounds", type=int, default=6, help="fresh worker pairs (each answers every cell once)")
    parser.add_argument("--repeats", type=int, default=8, help="generate() calls per cell and round")
    parser.add_argument("--families", default="llava,qwen2_vl")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--methods", default=",".join(CONFIGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if not (args.old and args.new):
        parser.error("give the two checkouts, OLD and NEW")
    args.old, args.new = (str(Path(tree).resolve()) for tree in (args.old, args.new))
    cells = [(f, int(b), m) for f in args.families.split(",") for b in args.batches.split(",")
             for m in args.methods.split(",")]  # fmt: skip
    runs: dict = {cell: {"old": [], "new": []} for cell in cells}
    for round_ in range(args.rounds):
        workers = {"old": _start(args.old), "new": _start(args.new)}  # fresh processes: layout luck averages out
        try:
            for position, cell in enumerate(cells):
                for side in ("old", "new") if (round_ + position) % 2 == 0 else ("new", "old"):
                    runs[cell][side].append(_ask(workers[side], cell, args.repeats))
        finally:
            for process in workers.values():
                process.stdin.close()
                process.wait()
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def median(side_runs: list, which: int) -> float:
        return statistics.median(value for run in side_runs for value in run[which])

    print("| cell | old prefill ms | new prefill ms | new / old | old decode ms | new decode ms |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios: dict[int, list[float]] = {}
    for cell in cells:
        old, new = median(runs[cell]["old"], 0), median(runs[cell]["new"], 0)
        ratios.setdefault(cell[1], []).append(new / old)
        print(f"| {cell[0]} b{cell[1]} {cell[2]} | {old:.3f} | {new:.3f} | {new / old:.3f} | "
              f"{median(runs[cell]['old'], 1):.4f} | {median(runs[cell]['new'], 1):.4f} |")  # fmt: skip
    for batch, values in ratios.items():
        mean = math.exp(statistics.fmean(math.log(value) for value in values))
        print(f"\nbatch {batch}: geometric mean of new / old over {len(values)} cells: {mean:.3f}")


if __name__ == "__main__":
    main()

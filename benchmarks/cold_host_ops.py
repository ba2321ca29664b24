"""What one small host op costs warm, right after a cache-flushing workload, and inside a tiny VLM's forward: why
the engine's hooks cost 2-3x more inside generate() (`engine_host_time.py`) than replayed back to back
(`engine_hook_replay.py`).

Between two of the engine's hooks other code runs on the same core and evicts the caches (code and data) that
numpy's and torch's dispatch paths live in, so the first ops of every hook run cold. The "in situ" column is the
benchmark's own setting: the op runs in a pre-hook of the language model of `vlm_prune.toy_models`' tiny LLaVA
(hidden size 64, so its math is negligible), between the vision tower and the decoder. What evicts the caches there
is mostly transformers' Python and torch's dispatch, which a GPU host runs too (only the kernels move to the
device); so a GPU host's hooks are not simply at the warm figure either. Each distinct op path pays its own cold
cost (an op repeated in the same hook is near its warm figure): the engine's in-situ time follows the number of
distinct numpy / torch paths its hooks take more than the number of calls.

    python benchmarks/cold_host_ops.py --flush-mb 32 --out benchmarks/results/cold_host_ops.md

Method: each op is timed (`time.perf_counter`, 1 torch thread) 200 times back to back ("warm"), 60 times right
after each of three kinds of other work: a 1024 x 1024 matmul into a preallocated output (a decoder layer's
compute), a pass over `--flush-mb` MB of floats (its memory traffic), a 1 ms sleep (an idle core), and once in each
of 60 forwards of the tiny model, twice in a row (after 10 more forwards to warm up: "in situ", "in situ, again");
medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from speed import cpu_model  # benchmarks/speed.py, next to this script


def ops() -> dict:
    ids = torch.randint(0, 100, (8, 64))
    host = ids.numpy()
    flat = ids.reshape(-1).tolist()
    hidden = torch.randn(8, 64, 64)
    index = torch.sort(torch.randperm(64)[:48]).values.expand(8, -1).contiguous()
    return {
        "python: `7 in list` (512 ints)": lambda: 7 in flat,
        "numpy: `(ids == 7).any()`": lambda: bool((host == 7).any()),
        "numpy: `flatnonzero(ids == 7)`": lambda: np.flatnonzero(host == 7),
        "numpy: `ones((8, 64), bool)`": lambda: np.ones((8, 64), dtype=bool),
        "torch: `(ids == 7).any()` + bool": lambda: bool((ids == 7).any()),
        "torch: `arange(64)`": lambda: torch.arange(64),
        "torch: `gather` (8, 48) of (8, 64)": lambda: ids.gather(1, index),
        "torch: `index_select` rows of (8, 64, 64)": lambda: hidden.reshape(-1, 64).index_select(0, index.reshape(-1)),
    }


def flushes(flush_mb: int) -> dict:
    """What runs between two hook calls, in three stand-ins: a decoder layer's matmul, a pass over memory (no
    allocation in either), and the core going idle."""
    big, out = torch.randn(1024, 1024), torch.empty(1024, 1024)
    junk = np.random.rand(flush_mb * 1024 * 1024 // 8)
    return {
        "matmul 1024^2 (out=)": lambda: torch.mm(big, big, out=out),
        f"pass over {flush_mb} MB": lambda: junk.sum(),
        "sleep 1 ms": lambda: time.sleep(0.001),
    }


_TINY: dict = {}  # the tiny model and its inputs, built once


def in_situ(op, forwards: int = 60) -> tuple[float, float]:
    """Median seconds of `op` run in a pre-hook of the tiny LLaVA's language model, once per forward, and of the
    same op run again right after it in the same hook."""
    from vlm_prune.toy_models import build_tiny, make_inputs

    model = _TINY.get("model")
    if model is None:
        model = _TINY["model"] = build_tiny("llava")
        _TINY["inputs"] = make_inputs(model, batch=1)
    times: list[float] = []
    again: list[float] = []

    def hook(module, args, kwargs):
        started = time.perf_counter()
        op()
        middle = time.perf_counter()
        op()
        times.append(middle - started)
        again.append(time.perf_counter() - middle)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for _ in range(forwards + 10):
                model(**_TINY["inputs"], use_cache=True)
    finally:
        handle.remove()
    return statistics.median(times[10:]), statistics.median(again[10:])


def measure(flush_mb: int) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """(flush names, [(op, [warm us, us after each flush])]): medians of 200 warm calls and of 60 calls each right
    after one flush."""
    kinds = flushes(flush_mb)
    rows = []
    for name, op in ops().items():
        warm = []
        for _ in range(200):
            started = time.perf_counter()
            op()
            warm.append(time.perf_counter() - started)
        figures = [statistics.median(warm) * 1e6]
        for flush in kinds.values():
            cold = []
            for _ in range(60):
                flush()
                started = time.perf_counter()
                op()
                cold.append(time.perf_counter() - started)
            figures.append(statistics.median(cold) * 1e6)
        figures += [seconds * 1e6 for seconds in in_situ(op)]
        rows.append((name, figures))
    return [*kinds, "in situ", "in situ, again"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flush-mb", type=int, default=32, help="MB of floats summed by the memory pass")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_host_ops.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    kinds, rows = measure(args.flush_mb)
    lines = [
        "# One host op, warm and right after other work",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {cpu_model()}, {platform.machine()}, {os.cpu_count()} "
        f"logical CPUs, load average {load} at start; torch {torch.__version__}, numpy {np.__version__}; 1 thread "
        "(`benchmarks/cold_host_ops.py`). Microseconds, medians (warm: 200 calls back to back; after: 60 calls, each "
        "right after one run of the named work; in situ: once per forward of the tiny LLaVA, in its language model's "
        "pre-hook, where the engine's first stage runs; again: the same op right after it in that hook).",
        "",
        "| op | warm | " + " | ".join(kind if kind.startswith("in situ") else f"after {kind}" for kind in kinds) + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    lines += [f"| {name} | " + " | ".join(f"{value:.1f}" for value in figures) + " |" for name, figures in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

"""Host time the engine's hooks spend per forward, on the tiny models (where model compute is negligible).

On an accelerator the engine's Python work runs on the host while the device waits at the pre-LLM stage
(selection needs the vision features), so this time is the floor of the engine's cost per prefill there,
whatever the model size. It grows with the batch (the engine loops over rows). Compare it with the prefill
time of the model you serve: at 30 ms (a 7B model, ~600 tokens, one H200) 1 ms is 3 %.

    python benchmarks/engine_host_time.py --out benchmarks/results/engine_host_time.md

Method: tiny random models from `vlm_prune.toy_models` (every family this transformers builds), the
prefill with `logits_to_keep=1`, 1 torch thread; every hook the handle installs is wrapped with a host
timer (`speed.wrap_new_hooks`); median over `--repeats` forwards after 3 warm-up forwards. Selection is
included (it is part of a stage); the `keep-all@L0` row is the engine alone (a method that keeps all).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from speed import _hook_keys, keep_all_at, wrap_new_hooks  # benchmarks/speed.py, next to this script

import vlm_prune
from vlm_prune.toy_models import available_families, build_tiny, make_inputs

CONFIGS = (("keep-all@L0", None), ("random", 0.25), ("pool", 0.25), ("divprune", 0.25), ("fastv", 0.25))


def in_llm_fastv(family: str) -> dict:
    return {"layer": 3} if family == "qwen3_vl" else {}


def hook_ms(model, inputs: dict, method, options: dict, repeats: int) -> float:
    before = _hook_keys(model)
    total = [0.0]
    samples = []
    with vlm_prune.pruned(model, method, **options), torch.no_grad():
        wrap_new_hooks(model, before, total)
        for index in range(repeats + 3):
            total[0] = 0.0
            model(**inputs, use_cache=True, logits_to_keep=1)
            if index >= 3:
                samples.append(total[0] * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(available_families()), help="comma-separated toy families")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=25, help="measured forwards per cell (default 25)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_host_time.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for family in args.families.split(","):
        model = build_tiny(family)
        for batch in batches:
            inputs = make_inputs(model, batch=batch)
            cells = []
            for name, keep in CONFIGS:
                method = keep_all_at(0) if keep is None else name
                options = {} if keep is None else {"keep": keep, **(in_llm_fastv(family) if name == "fastv" else {})}
                cells.append(hook_ms(model, inputs, method, options, args.repeats))
            rows.append((family, batch, cells))
            print(family, batch, [f"{c:.2f}" for c in cells], flush=True)
    lines = [
        "# Engine host time per forward",
        "",
        f"- date {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.machine()}, {os.cpu_count()} logical "
        f"CPUs, 1 torch thread, load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}; "
        "`python benchmarks/engine_host_time.py`",
        f"- tiny random models, prefill with `logits_to_keep=1`; host time inside every hook of the handle, "
        f"median of {args.repeats} forwards; keep 0.25 for the methods (fastv at layer 2, 3 on Qwen3-VL)",
        "",
        "| family | batch | " + " | ".join(f"{name} ms" for name, _ in CONFIGS) + " |",
        "|---|---:|" + "---:|" * len(CONFIGS),
    ]
    for family, batch, cells in rows:
        lines.append(f"| {family} | {batch} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

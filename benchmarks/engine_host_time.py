"""Host time the engine's hooks spend per forward, and the device->host syncs they make, on the tiny models.

On an accelerator the engine's Python work runs on the host while the device waits at each stage (selection needs
the stage's hidden states), and every device->host sync drains the device queue. So this host time is the floor
of the engine's cost per prefill there, whatever the model size. Compare it with the prefill of the model you
serve: at 30 ms (a 7B model, ~600 tokens, one H200) 1 ms is 3 %.

    python benchmarks/engine_host_time.py --tag after      # measure, store under "after", write the report
    python benchmarks/engine_host_time.py --tag before --families llava --batches 1 --repeats 5   # smoke run

Method: tiny random models from `vlm_prune.toy_models` (every family this transformers builds), 1 torch thread.
Every hook the handle installs is wrapped with a timer of the thread's CPU time (`time.thread_time`: on this
shared machine wall time mostly measures other jobs) and every stage's `select` with another; the engine time of
a forward is the hooks' time minus the time inside `select` (the method's own selection, excluded as in the
issue's targets). Each of `--repeats` greedy generate() calls
(after one warm-up) gives one prefill and 4 decode steps, split at the top-level forwards; medians. A second,
shorter pass also times the engine's calls of device work (`DEVICE_OPS`: gathers, cache trim, transformers' 4-D
mask; asynchronous launches on a GPU, inline on a CPU) for an extra "excl. device ops" figure; the headline and
the targets keep them. Syncs: one
untimed generate() call with the inputs marked as device tensors and `vlm_prune.engine.syncs.SyncCounter`
around the hooks (a lower bound; see that module).
Results accumulate per tag in `--json` (default `benchmarks/results/engine_host_time.json`); the report
(`--out`) shows every tag side by side, with the targets: prefill <= 0.5 ms at batch 1, <= 1 ms at batch 8,
decode <= 0.1 ms per step, engine syncs <= 1 per stage (+1 to read the media layout) and 0 per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from speed import _hook_keys, cpu_model, keep_all_at  # benchmarks/speed.py, next to this script
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import vlm_prune
from vlm_prune.engine.syncs import SyncCounter, on_device
from vlm_prune.toy_models import available_families, build_tiny, make_inputs

CONFIGS = (("keep-all@L0", None), ("random", 0.25), ("pool", 0.25), ("divprune", 0.25), ("fastv", 0.25))
TARGETS = {"prefill_b1": 0.5, "prefill_b8": 1.0, "decode": 0.1}


def in_llm_fastv(family: str) -> dict:
    return {"layer": 3} if family == "qwen3_vl" else {}


CLOCK = time.thread_time  # CPU time of this thread: what the hooks cost, not the time other jobs took the core

#: the engine's calls of tensor work that a GPU runs asynchronously (launches, no host wait) but a CPU runs inline:
#: the compaction gathers, the visual-token gather, the cache trim and transformers' 4-D mask after an in-LLM
#: stage. Timed apart (only inside the hooks) for the extra "excl. device ops" figures; the headline includes them.
DEVICE_OPS = (
    ("vlm_prune.engine.stage_run", "compact_sequence"),
    ("vlm_prune.engine.stage_run", "take_rows"),
    ("vlm_prune.engine.handle", "compact_sequence"),  # (where engines before f5df194 called them)
    ("vlm_prune.engine.handle", "take_rows"),
    ("vlm_prune.engine.handle", "gather_tokens"),
    ("vlm_prune.engine.ragged", "trim_layers"),
    ("transformers.masking_utils", "create_causal_mask"),
    ("vlm_prune.engine.masks", "padded_causal_mask"),  # (the engine's own padded 4-D mask, from 9eea39f)
)
_INSIDE = [0]  # depth of timed hooks running (device ops count only inside them)
_SELECTING = [0]  # depth of timed `select` calls running


class TorchOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside the handle's timed hooks, apart: `engine` outside the methods'
    `select`, `selection` inside it. Unlike the times they are exact and the same on every machine. Each is a pass
    through torch's dispatcher; on a GPU each one that computes (not a view or a shape query) is a kernel launch,
    so this is the count the issue's "no per-row host work" is about."""

    def __init__(self) -> None:
        super().__init__()
        self.engine, self.selection = [0], [0]  # (one-element accumulators, as the timers': `_per_forward` splits)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _SELECTING[0]:
            self.selection[0] += 1
        elif _INSIDE[0]:
            self.engine[0] += 1
        return func(*args, **(kwargs or {}))


def wrap_new_hooks(model, before: set, total: list[float], handle=None) -> None:
    """Wrap every forward (pre-)hook not in `before` with a CPU-time timer adding to total[0] (same hook ids, so
    `handle.remove()` still removes them), and `handle`'s decoder-layer hooks, which it attaches per forward from
    their table (`vlm_prune/engine/layer_hooks.py`; engines before it kept them registered: found above)."""

    def timed(fn):
        def wrapper(*args, **kwargs):
            started = CLOCK()
            _INSIDE[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                _INSIDE[0] -= 1
                total[0] += CLOCK() - started

        return wrapper

    for module in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, attr)
            for key in list(hooks):
                if (id(module), attr, key) not in before:
                    hooks[key] = timed(hooks[key])
    layer_hooks = getattr(getattr(handle, "_layers", None), "hooks", {})
    for index, hook in list(layer_hooks.items()):
        layer_hooks[index] = timed(hook)


def _timed_selects(handle, total: list[float]) -> None:
    """Time every stage's `select` and `select_batch` (the method's selection, per row or for the batch)."""
    for stage in handle.stages:
        for name in ("select", "select_batch"):
            select = getattr(stage, name)
            if select is None:
                continue

            def timed(ctx, select=select):
                started = CLOCK()
                _SELECTING[0] += 1
                try:
                    return select(ctx)
                finally:
                    _SELECTING[0] -= 1
                    total[0] += CLOCK() - started

            setattr(stage, name, timed)


STEPS = 4  # decode steps per generate() call


def _timed_device_ops(total: list[float]) -> list[tuple]:
    """Wrap every `DEVICE_OPS` function with a CPU-time timer adding to total[0] while inside a timed hook.
    Returns what `_restore` puts back."""
    import importlib

    saved = []
    for module_name, name in DEVICE_OPS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an older engine without that module
            continue
        original = getattr(module, name, None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            if not _INSIDE[0]:
                return _original(*args, **kwargs)
            started = CLOCK()
            try:
                return _original(*args, **kwargs)
            finally:
                total[0] += CLOCK() - started

        setattr(module, name, timed)
        saved.append((module, name, original))
    return saved


def _restore(saved: list[tuple]) -> None:
    for module, name, original in saved:
        setattr(module, name, original)


def _per_forward(model, totals: list[list[float]], marks: list) -> torch.utils.hooks.RemovableHandle:
    """Snapshot `totals` at the start of every top-level forward (before the handle's own hook)."""
    return model.register_forward_pre_hook(lambda module, args: marks.append([t[0] for t in totals]), prepend=True)


def _splits(marks: list, totals: list[list[float]]) -> list[list[float]]:
    ends = marks[1:] + [[t[0] for t in totals]]
    return [[b - a for a, b in zip(start, end)] for start, end in zip(marks, ends)]


def measure(model, inputs: dict, method, options: dict, repeats: int) -> dict:
    """Median engine ms of a prefill and of a decode step inside generate(), and the syncs of each."""
    before = _hook_keys(model)
    hooks, selects, device = [0.0], [0.0], [0.0]
    prefill, decode, prefill_host, decode_host = [], [], [], []
    generate = {"max_new_tokens": STEPS + 1, "min_new_tokens": STEPS + 1, "do_sample": False}
    with vlm_prune.pruned(model, method, **options) as handle, torch.no_grad():
        stages = len(handle.stages)
        with SyncCounter(handle) as counter:  # untimed: marked inputs make every op slower
            counts: list[int] = [0]  # syncs before the first forward (generate() encodes the media) count to it
            timer = model.register_forward_pre_hook(lambda module, args: counts.append(counter.count), prepend=True)
            try:
                model.generate(**on_device(inputs), **generate)
            finally:
                timer.remove()
            counts.append(counter.count)
            per = [b - a for a, b in zip(counts, counts[1:])]
            where = [s.where for s in counter.syncs]
        wrap_new_hooks(model, before, hooks, handle)
        _timed_selects(handle, selects)
        totals = [hooks, selects, device]

        def run(calls: int, into_prefill: list, into_decode: list, minus_device: bool) -> None:
            for _ in range(calls):
                marks = []
                timer = _per_forward(model, totals, marks)
                try:
                    model.generate(**inputs, **generate)
                finally:
                    timer.remove()
                values = [(h - s - (d if minus_device else 0.0)) * 1e3 for h, s, d in _splits(marks, totals)]
                into_prefill.append(values[0])
                into_decode.extend(values[1:])

        run(1, [], [], False)  # warm-up
        run(repeats, prefill, decode, False)  # the headline: hooks minus selection
        # a second, shorter pass also times `DEVICE_OPS` apart (its timers never touch the headline figures)
        saved = _timed_device_ops(device)
        try:
            run(max(5, repeats // 2), prefill_host, decode_host, True)
        finally:
            _restore(saved)
        ops = _aten_ops(model, inputs, generate)
    return {
        "prefill_ms": statistics.median(prefill),
        "decode_ms": statistics.median(decode),
        "prefill_host_ms": statistics.median(prefill_host),  # excluding `DEVICE_OPS` (not the headline)
        "decode_host_ms": statistics.median(decode_host),  # (noisier: the shorter pass; not reported)
        "syncs_prefill": per[0] + per[1],
        "syncs_decode": max(per[2:]),
        "stages": stages,
        "where": where,
        **ops,
    }


def _aten_ops(model, inputs: dict, generate: dict) -> dict:
    """Aten ops of the engine and of the selection in the prefill, and of the engine in the busiest decode
    step, in one untimed generate() call (hooks and selects already wrapped)."""
    marks: list = []
    with TorchOps() as counter:
        totals = [counter.engine, counter.selection]
        start = _per_forward(model, totals, marks)
        try:
            model.generate(**inputs, **generate)
        finally:
            start.remove()
    per = _splits(marks, totals)
    return {"ops_prefill": per[0][0], "ops_select": per[0][1], "ops_decode": max(p[0] for p in per[1:])}


def clock_cost(calls: int = 20000) -> float:
    """Seconds one `CLOCK()` call takes (a system call on some VMs): each timed hook adds about one to its time."""
    started = time.perf_counter()
    for _ in range(calls):
        CLOCK()
    return (time.perf_counter() - started) / calls


def plot(results: dict, path: Path) -> None:
    """Median engine ms over the methods, per family: prefill at batch 1 and 8 and decode, one bar per tag."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tags = [tag for tag in results if not tag.startswith("_")]
    families = list(dict.fromkeys(key.split("|")[0] for key in results[tags[-1]]["rows"]))
    panels = [("prefill, batch 1", "prefill_ms", "1", TARGETS["prefill_b1"]),
              ("prefill, batch 8", "prefill_ms", "8", TARGETS["prefill_b8"]),
              ("decode step (batches 1 and 8)", "decode_ms", None, TARGETS["decode"])]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(len(tags), 1)
    for axis, (title, field, batch, target) in zip(axes, panels):
        for number, tag in enumerate(tags):
            rows = results[tag]["rows"]
            values = []
            for family in families:
                cells = [row[field] for key, row in rows.items()
                         if key.split("|")[0] == family and (batch is None or key.split("|")[1] == batch)]
                values.append(statistics.median(cells) if cells else float("nan"))
            axis.bar([i + number * width for i in range(len(families))], values, width, label=tag)
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target} ms")
        axis.set_xticks([i + width * (len(tags) - 1) / 2 for i in range(len(families))])
        axis.set_xticklabels(families, rotation=30, ha="right", fontsize=8)
        axis.set_title(title)
        axis.set_ylabel("engine ms per forward (median over methods)")
    axes[0].legend(fontsize=8)
    figure.suptitle("vlm_prune engine host time per forward (selection excluded), tiny models, 1 CPU thread")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(results: dict) -> str:
    """The report: every tag's table side by side; `_notes` (text) first and `_history` (text) last, if set."""
    tags = [tag for tag in results if not tag.startswith("_")]
    lines = [
        "# Engine host time per forward and device->host syncs",
        "",
        "`python benchmarks/engine_host_time.py --tag <tag>`: tiny random models, 1 torch thread; engine time = "
        "CPU time (`time.thread_time`) "
        "inside the handle's hooks minus the time inside the methods' `select`; medians; keep 0.25 for the "
        "methods (fastv at layer 2, 3 on Qwen3-VL); decode = a step of greedy generate() (4 per call). "
        "Syncs counted by "
        "`vlm_prune.engine.syncs.SyncCounter` (engine hooks only, selection excluded; a lower bound).",
        f"Targets: prefill <= {TARGETS['prefill_b1']} ms at batch 1 and <= {TARGETS['prefill_b8']} ms at batch 8, "
        f"decode <= {TARGETS['decode']} ms per step; syncs <= 1 per stage + 1 (media layout) per prefill, 0 per step.",
        "",
    ]
    for tag in tags:
        meta = results[tag]["meta"]
        clock = f"; one CLOCK() call {meta['clock_us']} us" if "clock_us" in meta else ""
        lines.append(
            f"- **{tag}**: {meta['date']}, git {meta['git']}, {meta['machine']}, load average "
            f"{meta['load_start']} at start, {meta['load_end']} at end; {meta['repeats']} repeats; torch "
            f"{meta['torch']}, transformers {meta['transformers']}{clock}"
        )
    lines += ["", "| family | batch | method | " + " | ".join(
        f"{tag} prefill ms | {tag} decode ms | {tag} syncs (prefill / step) | {tag} aten ops (prefill + "
        "selection / step)" for tag in tags) + " |",
        "|---|---:|---|" + "---:|---:|---:|---:|" * len(tags)]
    keys = list(results[tags[-1]]["rows"])
    for key in keys:
        family, batch, name = key.split("|")
        cells = []
        for tag in tags:
            row = results[tag]["rows"].get(key)
            if row is None:
                cells += ["", "", "", ""]
            else:
                ops = (f"{row['ops_prefill']} + {row['ops_select']} / {row['ops_decode']}"
                       if "ops_prefill" in row else "")  # (tags measured before the count existed)
                cells += [f"{row['prefill_ms']:.2f}", f"{row['decode_ms']:.3f}",
                          f"{row['syncs_prefill']} / {row['syncs_decode']}", ops]
        lines.append(f"| {family} | {batch} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Worst case per tag (over families and methods):", ""]
    for tag in tags:
        rows = results[tag]["rows"]
        def worst(batch, field, rows=rows):
            values = [r[field] for k, r in rows.items() if k.split("|")[1] == str(batch)]
            return max(values) if values else float("nan")
        b1, b8 = worst(1, "prefill_ms"), worst(8, "prefill_ms")
        dec = max(r["decode_ms"] for r in rows.values())
        extra = max(r["syncs_prefill"] - r["stages"] for r in rows.values())
        step = max(r["syncs_decode"] for r in rows.values())
        lines.append(
            f"- {tag}: prefill {b1:.2f} ms at batch 1 ({'met' if b1 <= TARGETS['prefill_b1'] else 'missed'}), "
            f"{b8:.2f} ms at batch 8 ({'met' if b8 <= TARGETS['prefill_b8'] else 'missed'}); decode {dec:.3f} ms "
            f"({'met' if dec <= TARGETS['decode'] else 'missed'}); syncs per prefill at most stages + {extra}, per "
            f"decode step at most {step}"
        )
    lines += ["", "Median and best cell per tag (prefill at batch 1 / batch 8, decode step; ms). \"excl. device "
              "ops\": the same cells' engine time minus the calls in `DEVICE_OPS` (gathers, cache trim, "
              "transformers' 4-D mask: asynchronous launches on a GPU, inline work on this CPU), from a second, "
              "shorter pass; the targets apply to the headline columns.", "",
              "| tag | prefill b1 median | best | prefill b8 median | best | decode median | best | "
              "excl. device ops: prefill b1 / b8 medians |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    wanted = ((1, "prefill_ms"), (8, "prefill_ms"), (None, "decode_ms"))
    for tag in tags:
        rows = results[tag]["rows"]
        figures, host = [], []
        for batch, field in wanted:
            chosen = [r for k, r in rows.items() if batch is None or k.split("|")[1] == str(batch)]
            values = [r[field] for r in chosen]
            figures += [f"{statistics.median(values):.2f}", f"{min(values):.2f}"] if values else ["", ""]
            apart = [r[field.replace("_ms", "_host_ms")] for r in chosen if field.replace("_ms", "_host_ms") in r]
            if batch is not None:  # (a decode step makes no `DEVICE_OPS` call on a trimmed cache)
                host.append(f"{statistics.median(apart):.2f}" if apart else "-")
        lines.append(f"| {tag} | " + " | ".join(figures) + " | " + " / ".join(host) + " |")
    if results.get("_notes"):
        lines[2:2] = [results["_notes"].rstrip(), ""]
    if results.get("_history"):
        lines += ["", results["_history"].rstrip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(available_families()), help="comma-separated toy families")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--methods", default=",".join(name for name, _ in CONFIGS), help="subset of the configs")
    parser.add_argument("--repeats", type=int, default=25, help="measured forwards per cell (default 25)")
    parser.add_argument("--tag", default="after", help="name of this measurement in the report (before / after)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/engine_host_time.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_host_time.md"))
    parser.add_argument("--plot", type=Path, default=None, help="figure of every tag (default: --out with .png)")
    parser.add_argument("--git", default=None, help="the code measured, for the report (default: this checkout's HEAD)")
    parser.add_argument("--shared", default="shared with other jobs", help="who else uses the CPUs (for the report)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import subprocess

    head = ["git", "rev-parse", "--short", "HEAD"]
    git = args.git or subprocess.run(head, capture_output=True, text=True).stdout.strip()
    meta = {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "git": git,
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} logical CPUs {args.shared}",
        "clock_us": round(clock_cost() * 1e6, 2),
        "load_start": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    wanted = set(args.methods.split(","))
    configs = [(name, keep) for name, keep in CONFIGS if name in wanted]
    batches = [int(b) for b in args.batches.split(",")]
    families = args.families.split(",")
    rows = {}
    progress = tqdm(total=len(families) * len(batches) * len(configs), desc="cells")
    for family in families:
        model = build_tiny(family)
        for batch in batches:
            inputs = make_inputs(model, batch=batch)
            for name, keep in configs:
                method = keep_all_at(0) if keep is None else name
                options = {} if keep is None else {"keep": keep, **(in_llm_fastv(family) if name == "fastv" else {})}
                rows[f"{family}|{batch}|{name}"] = row = measure(model, inputs, method, options, args.repeats)
                progress.set_postfix_str(f"{family} b{batch} {name} {row['prefill_ms']:.2f} ms")
                progress.update()
    progress.close()
    meta["load_end"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results[args.tag] = {"meta": meta, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.out.write_text(render(results))
    plot(results, args.plot or args.out.with_suffix(".png"))
    print(args.out.read_text())


if __name__ == "__main__":
    main()

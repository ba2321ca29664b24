"""`vlm-prune bench`: accuracy kept against visual tokens kept, and the time it buys.

    from vlm_prune.bench import run_bench
    result = run_bench("llava", quick=True, out_dir="bench_results")   # embedded demo model, mosaic task
    print(result["markdown"])

For one model and one task, every method (default: every registered method) runs at every budget
(default: keep 1.0 / 192 / 128 / 64 visual tokens per image; 1.0 is the unpruned reference, run on the bare
model without any hook). Per method and budget it records:

- accuracy (exact match of the greedy answer), overall, on cell questions and per question type, and the
  same divided by the unpruned model's (relative accuracy);
- visual tokens in and kept per sample (mean over the evaluated samples) and the equivalent average visual
  tokens over decoder layers (what an in-LLM schedule costs; equal to the kept count for pre-LLM methods);
- LLM prefill FLOPs (formula in `vlm_prune.engine.stats`) and KV-cache bytes after prefill, both per sample,
  measured at batch 1 on a fixed sample (the first one);
- latency at batch 1 on that fixed sample, each the median of `repeats` runs after `warmup` runs: the prefill
  (time to first token: vision encoder + LLM prefill, the scoring included), the vision encoder on its own,
  the selection (scoring) time on its own, and the per-token decode time; speedup = unpruned prefill /
  pruned prefill.

A method that raises `vlm_prune.PruneError` on this model or budget (it needs video, the budget is out of its
reach, ...) is skipped and the reason recorded. A method that refuses an int token count (AdaptInfer without a
preset, "+" compositions) is retried with the same budget as a fraction of the image's visual tokens
(``keep / N``), and the row says so (`keep_passed`).

Outputs (when `out_dir` is given): `bench_<model>.md` (the table), `bench_<model>.json` (schema:
`vlm_prune/bench_schema.json`) and `bench_<model>.png` (accuracy against tokens, speedup against tokens).
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .bench_models import ModelSpecError, _short_name, load_bench_model  # noqa: F401  (re-exported)
from .bench_report import (  # noqa: F401  (re-exported: the report API lives in bench_report)
    SCHEMA_PATH,
    UNPRUNED,
    _keep_label,
    _machine_line,
    _validate,
    load_schema,
    plot,
    to_markdown,
    validate,
    write_outputs,
)
from .bench_tasks import TASKS as _BENCH_TASKS
from .bench_tasks import BenchTask, get_task
from .bench_timing import _device_of, _latency_round_robin, _time_once, _vision_module, _VisionTimer
from .errors import BudgetError, PruneError

SCHEMA_VERSION = 1
#: task name -> description (the tasks themselves: `vlm_prune.bench_tasks.TASKS`)
TASKS: dict[str, str] = {name: task.description for name, task in _BENCH_TASKS.items()}
DEFAULT_KEEPS: tuple[float | int, ...] = (1.0, 192, 128, 64)
DEFAULTS: dict[str, Any] = {
    "n_samples": 400,
    "repeats": 7,
    "warmup": 2,
    "batch_size": 8,
    "max_new_tokens": 4,
    "decode_tokens": 8,
}
#: what `quick=True` changes (the rest as given): sized to finish in < 3 minutes on 2 CPU cores with
#: either embedded model (Qwen2-VL's ViT attends over 2304 patches: ~90 ms per mosaic on one thread; with the 9
#: image methods at 2 budgets, 64 samples took Qwen2-VL 237-376 s, so 40: 10 per question type)
QUICK: dict[str, Any] = {
    "n_samples": 40,
    "repeats": 5,
    "warmup": 1,
    "keeps": (1.0, 192, 64),
    "decode_tokens": 4,
}


class BenchError(PruneError, ValueError):
    """Bad arguments to the bench (unknown task, budget, ...)."""


# ------------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, core count, OS, Python / torch / transformers versions and the device timed on."""
    import transformers

    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "gpu": gpu,
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages when the run started (other work on the CPU skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None

# ------------------------------------------------------------------------------------------------ helpers
def _parse_keeps(keeps: Sequence[Any]) -> list[float | int]:
    out: list[float | int] = []
    for k in keeps:
        if isinstance(k, str):
            k = k.strip()
            k = int(k) if re.fullmatch(r"\d+", k) else float(k)
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise BenchError(
                f"budget {k!r}: pass fractions in (0, 1] or int token counts per image, e.g. 1.0 192 128 64"
            )
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise BenchError(f"budget {k!r}: a fraction must be in (0, 1]; a token count must be an int such as 64")
        if isinstance(k, int) and k < 1:
            raise BenchError(f"budget {k!r}: a token count must be >= 1")
        if k not in out:
            out.append(k)
    return out


def _is_reference(keep: float | int) -> bool:
    return isinstance(keep, float) and keep >= 1.0


def _media_ids(model) -> list[int]:
    from .calibrate_runner import media_token_ids

    return media_token_ids(model)


def _count_visual(inputs, media: list[int]) -> int:
    ids = inputs["input_ids"]
    return int(torch.isin(ids, torch.tensor(media, device=ids.device)).sum())


@torch.no_grad()
def _evaluate(
    model, processor, samples, handle, task: BenchTask, *, batch_size: int, max_new_tokens: int, bar
) -> dict[str, Any]:
    """Accuracy overall / per question type, and per-sample means of the pruning stats over all batches."""
    from .demo import normalize_answer

    preds: list[str] = []
    scored: list[dict] = []  # tasks scored per sample instead of by exact-match answers (segmentation: IoU)
    tokens_in = tokens_out = 0
    equivalent = 0.0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        if task.score_samples is not None:
            scored.extend(task.score_samples(model, processor, chunk))
        else:
            answers = task.answers(model, processor, chunk, max_new_tokens)
            preds.extend(normalize_answer(a) for a in answers)
        if handle is not None:
            st = handle.stats
            tokens_in += st.visual_tokens_in
            tokens_out += st.visual_tokens_out
            equivalent += st.equivalent_average_tokens * len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    n = len(samples)

    def score(idx: list[int]) -> dict[str, Any]:
        if scored:
            correct = sum(scored[j]["score"] for j in idx)
        else:
            correct = sum(preds[j] == normalize_answer(samples[j].answer) for j in idx)
        return {"accuracy": correct / len(idx) if idx else None, "n": len(idx), "correct": correct}

    idx = list(range(n))
    focus = task.focus_qtypes
    per = {q: score([j for j in idx if samples[j].qtype == q]) for q in dict.fromkeys(s.qtype for s in samples)}
    out = {
        **score(idx),
        "cell_accuracy": score([j for j in idx if focus is None or samples[j].qtype in focus])["accuracy"],
        "per_qtype": per,
        "predictions": preds or [round(s["score"], 4) for s in scored],
        "pooled": task.pooled(scored) if scored and task.pooled is not None else {},
    }
    if handle is not None and n:
        out["visual_tokens_in"] = tokens_in / n
        out["visual_tokens_kept"] = tokens_out / n
        out["equivalent_average_tokens"] = equivalent / n
    return out


def _rel(value, ref):
    if value is None or ref is None or not ref:
        return None
    return value / ref


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------------------------------------ main
def run_bench(
    model_spec: str | None = None,
    task: str = "mosaic",
    methods: Sequence[str] | None = None,
    keeps: Sequence[float | int] | None = None,
    n_samples: int | None = None,
    repeats: int | None = None,
    quick: bool = False,
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    warmup: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    decode_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
    model=None,
    processor=None,
    samples=None,
    name: str | None = None,
) -> dict[str, Any]:
    """Benchmark pruning methods on one model and task; returns the result dict (see bench_schema.json).

    Args:
        model_spec: "llava" / "qwen2_vl" / "qwen2_vl_video" (embedded demo models), a local model folder, or a
            hub id; None = the task's embedded model.
        task: "mosaic" (images) or "video" (see `TASKS` and `vlm_prune.bench_tasks`).
        methods: method names or "a+b" compositions; None = the task's methods (mosaic: every registered one).
        keeps: budgets; an int is visual tokens kept per image (video), a float a fraction; 1.0 = the unpruned
            reference. None = the task's budgets (mosaic 1.0/192/128/64, video 1.0/0.5/0.25/0.1).
        n_samples: test samples evaluated per method and budget (default 400; quick: 96).
        repeats: timed repeats per latency (median reported; default 7; quick: 5), after `warmup` runs.
        quick: small sizes (`QUICK`): fewer samples and repeats, budgets 1.0/192/64 (unless `keeps` is
            given as something else than the default), 1 CPU thread unless `threads` is given.
        out_dir: where to write bench_<name>.md/.json/.png; None = write nothing.
        seed: seed of the test samples and of random methods.
        progress: show tqdm progress bars.
        model, processor: an already loaded model and processor (then `model_spec` only names it).
        samples: evaluation samples (objects with .image, .question, .answer, .qtype) instead of the task's.
        name: the file stem (default from model_spec).
        threads: torch CPU threads for the run (None = leave torch's setting). On a CPU shared with other
            work, 1 thread gives far steadier timings.
    """
    previous_threads = torch.get_num_threads()
    if threads is None and quick and torch.device(device).type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run_bench(**{k: v for k, v in locals().items() if k not in ("previous_threads", "threads")})
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(
    model_spec,
    task,
    methods,
    keeps,
    n_samples,
    repeats,
    quick,
    out_dir,
    seed,
    progress,
    *,
    warmup,
    batch_size,
    max_new_tokens,
    decode_tokens,
    device,
    dtype,
    model,
    processor,
    samples,
    name,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    import vlm_prune

    t_start = time.perf_counter()
    bench_task = get_task(task)
    model_spec = model_spec or bench_task.default_model
    keeps_given = tuple(keeps) if keeps is not None else bench_task.default_keeps
    if quick and keeps_given == bench_task.default_keeps:
        keeps_given = bench_task.quick_keeps
    keep_list = _parse_keeps(keeps_given)
    if not any(_is_reference(k) for k in keep_list):
        keep_list.insert(0, 1.0)  # the reference is always measured: everything is relative to it
    keep_list.sort(key=lambda k: (not _is_reference(k), -(k if isinstance(k, int) else k * 1e9)))

    def pick(value, key):
        if value is not None:
            return value
        return QUICK.get(key, DEFAULTS[key]) if quick else DEFAULTS[key]

    if n_samples is None and quick and bench_task.quick_samples:
        n_samples = bench_task.quick_samples
    n_samples = int(pick(n_samples, "n_samples"))
    repeats = int(pick(repeats, "repeats"))
    warmup = int(pick(warmup, "warmup"))
    batch_size = int(pick(batch_size, "batch_size"))
    max_new_tokens = int(pick(max_new_tokens, "max_new_tokens"))
    decode_tokens = int(pick(decode_tokens, "decode_tokens"))
    if n_samples < 1 or repeats < 1 or warmup < 0 or batch_size < 1:
        raise BenchError("n_samples, repeats and batch_size must be >= 1 and warmup >= 0")

    registered = vlm_prune.methods()
    if methods is None:
        method_list = list(bench_task.default_methods or registered)
    else:
        method_list = [m.strip() for m in methods if m and m.strip()]
        from .methods.registry import parse_spec

        for m in method_list:
            parse_spec(m)  # UnknownMethodError listing the known names
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    # ---- model and data
    if model is None:
        load = bench_task.load_model or load_bench_model
        model, processor, model_info = load(model_spec, dtype=torch_dtype, device=device)
    else:
        if processor is None:
            raise BenchError("pass the processor together with the model")
        model_info = {"spec": str(model_spec), "source": "object"}
    model.eval()
    from .adapters import adapter_for

    adapter = adapter_for(model)  # UnsupportedModelError before any work
    name = name or _short_name(model_spec)
    if samples is None:
        samples = bench_task.samples(n_samples, seed)
    samples = list(samples)[:n_samples]
    media = _media_ids(model)
    fixed = bench_task.prepare(model, processor, samples[:1])
    visual_per_image = _count_visual(fixed, media)
    params = sum(p.numel() for p in model.parameters())
    model_info.update(
        {
            "name": name,
            "class": type(model).__name__,
            "family": adapter.family,
            "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
            "num_layers": len(adapter.layers),
            "parameters": params,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(adapter.text_config, "_attn_implementation", None),
            "visual_tokens_per_image": visual_per_image,
        }
    )
    qtype_counts: dict[str, int] = {}
    for s in samples:
        qtype_counts[s.qtype] = qtype_counts.get(s.qtype, 0) + 1

    runs = [(UNPRUNED, k) for k in keep_list if _is_reference(k)][:1]
    runs += [(m, k) for m in method_list for k in keep_list if not _is_reference(k)]
    runs += [(m, None) for m in method_list if m in bench_task.own_budget]  # the method's own count
    outer = tqdm(total=len(runs), desc=f"bench {name}", unit="run", disable=not progress)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    from .engine.stats import LayerShape

    shape = LayerShape.from_config(adapter.text_config)
    timer = _VisionTimer(_vision_module(model), _device_of(model))
    configs: list[tuple[str, float | int | None, dict[str, Any]]] = []
    for method, keep in runs:
        outer.set_postfix_str(f"{method} @ {_keep_label(keep)}")
        inner = tqdm(
            total=len(samples), desc=f"{method} {_keep_label(keep)}", unit="q", leave=False, disable=not progress
        )
        handle = None
        keep_passed: float | int | None = None
        note = None
        try:
            if method != UNPRUNED:
                keep_passed = keep
                try:
                    handle = vlm_prune.apply(model, method, keep=keep, seed=seed)
                except BudgetError as e:
                    if not isinstance(keep, int) or not visual_per_image:
                        raise
                    keep_passed = min(1.0, keep / visual_per_image)
                    note = f"refused keep={keep} ({e}); run with keep={keep_passed:.4f} = {keep}/{visual_per_image}"
                    handle = vlm_prune.apply(model, method, keep=keep_passed, seed=seed)
            ev = _evaluate(
                model, processor, samples, handle, bench_task,
                batch_size=batch_size, max_new_tokens=max_new_tokens, bar=inner,
            )  # fmt: skip
            probe = _time_once(model, fixed, handle, timer, 0)  # stats of the fixed sample at batch 1
            row = _row(ev, probe, fixed, shape, visual_per_image, len(adapter.layers))
            configs.append((method, keep_passed, row))
        except PruneError as e:
            skipped.append({"method": method, "keep": keep, "status": "skipped", "reason": f"{type(e).__name__}: {e}"})
            row = None
        except Exception as e:  # noqa: BLE001 - a crash in one method must not lose the whole bench
            last = traceback.format_exc().strip().splitlines()[-1]
            skipped.append(
                {
                    "method": method,
                    "keep": keep,
                    "status": "failed",
                    "reason": f"{type(e).__name__}: {e}",
                    "traceback_tail": last,
                }
            )
            print(f"warning: {method} @ {_keep_label(keep)} failed: {type(e).__name__}: {e}", file=sys.stderr)
            row = None
        finally:
            if handle is not None:
                handle.remove()
            inner.close()
        outer.update(1)
        if row is None:
            continue
        row.update(
            {"method": method, "keep": keep, "keep_label": _keep_label(keep), "keep_passed": keep_passed, "note": note}
        )
        if method == UNPRUNED:
            reference = row
        results.append(row)
    outer.close()
    try:
        _latency_round_robin(
            model, fixed, configs, timer, seed=seed, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens,
            progress=progress, name=name,
        )  # fmt: skip
    finally:
        timer.remove()

    ref = reference or {}
    for row in results:
        row["relative_accuracy"] = _rel(row["accuracy"], ref.get("accuracy"))
        row["relative_cell_accuracy"] = _rel(row["cell_accuracy"], ref.get("cell_accuracy"))
        for key in row["pooled"]:  # a task's pooled metrics (segmentation: cIoU)
            row[f"relative_{key}"] = _rel(row["pooled"][key], ref.get("pooled", {}).get(key))
        for q, d in row["per_qtype"].items():
            d["relative_accuracy"] = _rel(d["accuracy"], ref.get("per_qtype", {}).get(q, {}).get("accuracy"))
        lat = row["latency"]
        ref_lat = ref.get("latency") or {}
        row["speedup"] = _rel(ref_lat.get("prefill_ms"), lat["prefill_ms"])
        row["llm_prefill_speedup"] = _rel(ref_lat.get("llm_prefill_ms"), lat["llm_prefill_ms"])

    result = {
        "schema_version": SCHEMA_VERSION,
        "tool": "vlm_prune.bench",
        "vlm_prune_version": vlm_prune.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_info,
        "task": {
            "name": task,
            "description": bench_task.description,
            "media": bench_task.media,
            "metric": bench_task.metric_name,
            "focus": bench_task.focus_name,
            "split": "test",
            "n_samples": len(samples),
            "seed": seed,
            "qtypes": qtype_counts,
        },
        "settings": {
            "methods": method_list,
            "keeps": keep_list,
            "quick": bool(quick),
            "repeats": repeats,
            "warmup": warmup,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decode_tokens": decode_tokens,
            "latency_batch": 1,
            "latency_sample": 0,
            "device": str(_device_of(model)),
        },
        "machine": describe_machine(_device_of(model)),
        "reference": reference,
        "results": results,
        "skipped": skipped,
        "elapsed_seconds": time.perf_counter() - t_start,
    }
    result = _clean(result)
    result["markdown"] = to_markdown(result)
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


def _row(ev: dict, probe: dict, fixed, shape, visual_per_image: int, num_layers: int) -> dict[str, Any]:
    """One result row from the accuracy run and the batch-1 probe of the fixed sample (latency comes later)."""
    length = int(fixed["input_ids"].shape[1])
    flops_unpruned = shape.prefill_flops([length] * num_layers)
    kv_bytes = probe["kv_bytes"]
    st = probe["stats"]
    if st is None:
        tokens_in = tokens_kept = equivalent = float(visual_per_image)
        flops, kv_unpruned, stages = flops_unpruned, kv_bytes, []
    else:
        tokens_in, tokens_kept = ev["visual_tokens_in"], ev["visual_tokens_kept"]
        equivalent = ev["equivalent_average_tokens"]
        flops, flops_unpruned = st.prefill_flops, st.prefill_flops_unpruned
        kv_unpruned = st.kv_cache_bytes_unpruned
        stages = [
            {"name": s.name, "layer": s.layer, "tokens_in": s.total_in, "tokens_out": s.total_out} for s in st.stages
        ]
    return {
        "accuracy": ev["accuracy"],
        "cell_accuracy": ev["cell_accuracy"],
        "n": ev["n"],
        "correct": ev["correct"],
        "per_qtype": ev["per_qtype"],
        "pooled": ev["pooled"],
        **ev["pooled"],
        "visual_tokens_in": tokens_in,
        "visual_tokens_kept": tokens_kept,
        "keep_ratio": tokens_kept / tokens_in if tokens_in else None,
        "equivalent_average_tokens": equivalent,
        "prefill_flops": int(flops),
        "prefill_flops_unpruned": int(flops_unpruned),
        "flops_ratio": flops / flops_unpruned if flops_unpruned else None,
        "kv_cache_bytes": int(kv_bytes) if kv_bytes is not None else None,
        "kv_cache_bytes_unpruned": int(kv_unpruned) if kv_unpruned is not None else None,
        "stages": stages,
        "latency": None,
    }


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite(obj)

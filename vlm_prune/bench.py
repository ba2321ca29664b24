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

import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import BudgetError, PruneError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "bench_schema.json"
TASKS: dict[str, str] = {
    "mosaic": "3x3 mosaics of easy-VQA shapes (192x192 px, held-out test split); questions about one cell "
    "(color, shape, yes/no) or the whole image (count)",
}
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
#: either embedded model (Qwen2-VL's ViT attends over 2304 patches: ~90 ms per mosaic on one thread)
QUICK: dict[str, Any] = {
    "n_samples": 64,
    "repeats": 5,
    "warmup": 1,
    "keeps": (1.0, 192, 64),
    "decode_tokens": 4,
}
UNPRUNED = "unpruned"


class BenchError(PruneError, ValueError):
    """Bad arguments to the bench (unknown task, budget, ...)."""


class ModelSpecError(PruneError, ValueError):
    """A model spec that is neither an embedded demo model, a loadable local folder, nor a reachable hub id."""


# --------------------------------------------------------------------------------------------- model loading
def _model_spec_help() -> str:
    from .demo import DEMO_MODELS

    return (
        f"pass an embedded demo model ({' or '.join(repr(m) for m in DEMO_MODELS)}), a local folder written by "
        "model.save_pretrained + processor.save_pretrained (it holds config.json and *.safetensors), or a "
        "Hugging Face hub id such as 'llava-hf/llava-1.5-7b-hf' (needs network access or a cached copy)"
    )


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a filesystem path (a hub id is "name" or "owner/name")."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or re.match(r"^[A-Za-z]:", spec):
        return True
    return spec.count("/") > 1 or spec.endswith("/")


def load_bench_model(model_spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor, info) for an embedded demo name, a local folder or a hub id.

    Raises `ModelSpecError` saying what to pass when the spec cannot be loaded.
    """
    from .demo import DEMO_MODELS, DemoModelError, demo_model, load_model

    spec = str(model_spec).strip()
    if not spec:
        raise ModelSpecError(f"no model given: {_model_spec_help()}")
    key = spec.lower().replace("-", "_")
    if key in DEMO_MODELS or key in ("qwen2vl", "qwen", "llava_1.5"):
        try:
            model, processor = demo_model(spec, dtype=dtype, device=device)
        except DemoModelError as e:
            raise ModelSpecError(f"{e}; or {_model_spec_help()}") from e
        return model, processor, {"spec": spec, "source": "embedded"}
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSpecError(f"model path {spec!r} is a file, not a model folder: {_model_spec_help()}")
        try:
            model, processor = load_model(path, dtype=dtype, device=device)
        except DemoModelError as e:
            raise ModelSpecError(f"cannot load a model from {spec!r}: {e}; {_model_spec_help()}") from e
        return model, processor, {"spec": spec, "source": "local"}
    if _looks_like_path(spec):
        raise ModelSpecError(f"model path {spec!r} does not exist: {_model_spec_help()}")
    local_only = _probe_hub(spec)
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(spec, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f"could not load hub model {spec!r} ({first}): {_model_spec_help()}") from e
    return model.to(device).eval(), processor, {"spec": spec, "source": "hub"}


def _probe_hub(spec: str) -> bool:
    """Whether `spec` must load from the local hub cache (True) or may download (False).

    Fails fast with `ModelSpecError` when the id is neither cached nor reachable, instead of letting
    transformers retry every file download for minutes.
    """
    try:
        import huggingface_hub as hub
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        cached = hub.try_to_load_from_cache(spec, "config.json")
    except (ValueError, TypeError) as e:  # not a valid repo id
        raise ModelSpecError(f"{spec!r} is not a local folder nor a valid hub id ({e}): {_model_spec_help()}") from e
    if isinstance(cached, str):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelSpecError(
            f"{spec!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE is set: {_model_spec_help()}"
        )
    try:
        hub.model_info(spec, timeout=10)
    except Exception as e:  # noqa: BLE001 - repository missing, gated, or no network: one clear message
        raise ModelSpecError(
            f"{spec!r} is not a local folder, not in the hub cache, and the hub lookup failed "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}): {_model_spec_help()}"
        ) from e
    return False


def _short_name(model_spec: str) -> str:
    name = Path(str(model_spec).rstrip("/")).name or str(model_spec)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


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


def _machine_line(machine: dict) -> str:
    where = machine["gpu"] or f"CPU {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} threads)"
    load = machine.get("load_average")
    if load and not machine["gpu"]:
        where += f", load average {load[0]:.1f} at start"
    versions = f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}"
    return f"{where}; {machine['platform']}; {versions}"


# ------------------------------------------------------------------------------------------------ helpers
def _keep_label(keep: float | int) -> str:
    if isinstance(keep, float) and keep >= 1.0:
        return "1.0 (unpruned)"
    if isinstance(keep, int):
        return f"{keep} tok"
    return f"{keep:g}"


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _prepare(processor, model, images, questions) -> Any:
    from .demo import prepare_inputs

    return prepare_inputs(model, processor, images, questions)


def _media_ids(model) -> list[int]:
    from .calibrate_runner import media_token_ids

    return media_token_ids(model)


def _count_visual(inputs, media: list[int]) -> int:
    ids = inputs["input_ids"]
    return int(torch.isin(ids, torch.tensor(media, device=ids.device)).sum())


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3 if times else float("nan")


class _VisionTimer:
    """Forward hooks on the vision tower that time its calls (synchronised on CUDA)."""

    def __init__(self, module, device: torch.device):
        self.device, self.seconds, self._start = device, 0.0, None
        self._handles = []
        if module is not None:
            self._handles = [
                module.register_forward_pre_hook(self._pre),
                module.register_forward_hook(self._post),
            ]

    def _pre(self, *_):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_):
        _sync(self.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def remove(self):
        for h in self._handles:
            h.remove()


def _vision_module(model):
    """The vision tower (LLaVA `vision_tower`, Qwen-VL `visual`), or None."""
    try:
        from .adapters import adapter_for

        module = adapter_for(model).vision_module()
    except PruneError:
        module = None
    inner = getattr(model, "model", model)
    return module or getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)


@torch.no_grad()
def _time_once(model, inputs, handle, timer: _VisionTimer, decode_tokens: int) -> dict[str, Any]:
    """One batch-1 measurement: prefill (TTFT) with the vision tower's share and the selection time, then
    one generate of 1 + decode_tokens tokens."""
    device = _device_of(model)
    timer.seconds = 0.0
    _sync(device)
    t0 = time.perf_counter()
    try:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = model(**inputs, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = out.get("cache")  # the transformers 5 name; reading out.past_key_values warns there
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    sample = {
        "prefill": prefill,
        "vision": timer.seconds,
        "select": handle.stats.select_seconds if handle is not None else 0.0,
        "kv_bytes": _cache_bytes(cache),
        "stats": copy.deepcopy(handle.stats) if handle is not None else None,
        "generate": None,
    }
    del out
    if decode_tokens > 0:
        n = decode_tokens + 1
        _sync(device)
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=_pad_id(model))
        _sync(device)
        sample["generate"] = time.perf_counter() - t0
    return sample


def _summarize_latency(runs: list[dict[str, Any]], decode_tokens: int) -> dict[str, Any]:
    prefill = [r["prefill"] for r in runs]
    generate = [r["generate"] for r in runs if r["generate"] is not None]
    prefill_ms = _median_ms(prefill)
    vision_ms = _median_ms([r["vision"] for r in runs])
    # generate(1 + D tokens) = prefill + D decode steps (+ generate's own small per-call overhead)
    decode = (
        max(0.0, (statistics.median(generate) - statistics.median(prefill)) / decode_tokens) * 1e3
        if generate and decode_tokens > 0
        else None
    )
    return {
        "prefill_ms": prefill_ms,
        "prefill_ms_runs": [t * 1e3 for t in prefill],
        "prefill_ms_min": min(prefill) * 1e3 if prefill else None,
        "vision_ms": vision_ms,
        "llm_prefill_ms": prefill_ms - vision_ms,
        "select_ms": _median_ms([r["select"] for r in runs]),
        "decode_ms_per_token": decode,
    }


def _pad_id(model) -> int | None:
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    if pad is None and gc is not None:
        eos = getattr(gc, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return pad


@torch.no_grad()
def _evaluate(model, processor, samples, handle, *, batch_size: int, max_new_tokens: int, bar) -> dict[str, Any]:
    """Accuracy overall / per question type, and per-sample means of the pruning stats over all batches."""
    from .demo import generate_answers, normalize_answer

    preds: list[str] = []
    tokens_in = tokens_out = 0
    equivalent = 0.0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        answers = generate_answers(
            model, processor, [s.image for s in chunk], [s.question for s in chunk], max_new_tokens
        )
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
        correct = sum(preds[j] == normalize_answer(samples[j].answer) for j in idx)
        return {"accuracy": correct / len(idx) if idx else None, "n": len(idx), "correct": correct}

    idx = list(range(n))
    cell_types = {"color", "shape", "yesno"}
    per = {q: score([j for j in idx if samples[j].qtype == q]) for q in dict.fromkeys(s.qtype for s in samples)}
    out = {
        **score(idx),
        "cell_accuracy": score([j for j in idx if samples[j].qtype in cell_types])["accuracy"],
        "per_qtype": per,
        "predictions": preds,
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
    model_spec: str = "llava",
    task: str = "mosaic",
    methods: Sequence[str] | None = None,
    keeps: Sequence[float | int] = DEFAULT_KEEPS,
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
        model_spec: "llava" / "qwen2_vl" (embedded demo models), a local model folder, or a hub id.
        task: "mosaic" (the embedded task; see `TASKS`).
        methods: method names or "a+b" compositions; None = every registered method.
        keeps: budgets; an int is visual tokens kept per image, a float a fraction; 1.0 = the unpruned reference.
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
    if task not in TASKS:
        raise BenchError(f"unknown task {task!r}; available tasks: {', '.join(TASKS)}")
    keeps_given = tuple(keeps) if keeps is not None else DEFAULT_KEEPS
    if quick and keeps_given == DEFAULT_KEEPS:
        keeps_given = QUICK["keeps"]
    keep_list = _parse_keeps(keeps_given)
    if not any(_is_reference(k) for k in keep_list):
        keep_list.insert(0, 1.0)  # the reference is always measured: everything is relative to it
    keep_list.sort(key=lambda k: (not _is_reference(k), -(k if isinstance(k, int) else k * 1e9)))

    def pick(value, key):
        if value is not None:
            return value
        return QUICK.get(key, DEFAULTS[key]) if quick else DEFAULTS[key]

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
        method_list = list(registered)
    else:
        method_list = [m.strip() for m in methods if m and m.strip()]
        from .methods.registry import parse_spec

        for m in method_list:
            parse_spec(m)  # UnknownMethodError listing the known names
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    # ---- model and data
    if model is None:
        model, processor, model_info = load_bench_model(model_spec, dtype=torch_dtype, device=device)
    else:
        if processor is None:
            raise BenchError("pass the processor together with the model")
        model_info = {"spec": str(model_spec), "source": "object"}
    model.eval()
    from .adapters import adapter_for

    adapter = adapter_for(model)  # UnsupportedModelError before any work
    name = name or _short_name(model_spec)
    if samples is None:
        from .data.mosaic import make_mosaics

        samples = make_mosaics("test", n_samples, seed=seed)
    samples = list(samples)[:n_samples]
    media = _media_ids(model)
    fixed = _prepare(processor, model, [samples[0].image], [samples[0].question])
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
                model, processor, samples, handle, batch_size=batch_size, max_new_tokens=max_new_tokens, bar=inner
            )
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
            "description": TASKS[task],
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


def _latency_round_robin(model, fixed, configs, timer, *, seed, repeats, warmup, decode_tokens, progress, name):
    """Time every configuration in turn, `warmup + repeats` rounds, so that drifting load on the machine hits
    all of them alike. Each turn applies the method afresh, runs one untimed prefill, then the timed prefill
    and generate (`_time_once`), and removes the method."""
    from tqdm.auto import tqdm

    import vlm_prune

    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    bar = tqdm(total=(warmup + repeats) * len(configs), desc=f"latency {name}", unit="run", disable=not progress)
    for round_index in range(warmup + repeats):
        for i, (method, keep_passed, _) in enumerate(configs):
            handle = None if method == UNPRUNED else vlm_prune.apply(model, method, keep=keep_passed, seed=seed)
            try:
                _time_once(model, fixed, handle, timer, 0)  # untimed: first call after apply
                sample = _time_once(model, fixed, handle, timer, decode_tokens)
            finally:
                if handle is not None:
                    handle.remove()
            if round_index >= warmup:
                runs[i].append(sample)
            bar.update(1)
    bar.close()
    for (_, _, row), samples in zip(configs, runs):
        row["latency"] = _summarize_latency(samples, decode_tokens)


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite(obj)


# ------------------------------------------------------------------------------------------------ outputs
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def to_markdown(result: dict[str, Any]) -> str:
    """The bench as markdown: settings, the main table, the selection overhead, skipped methods."""
    m, t, s = result["model"], result["task"], result["settings"]
    qtypes = list(t["qtypes"])
    lines = [
        f"## vlm-prune bench: {m['name']} ({m['class']}, {m['parameters'] / 1e6:.2f}M parameters, "
        f"{m['num_layers']} decoder layers, {m['visual_tokens_per_image']} visual tokens per image)",
        "",
        f"- task: {t['name']} ({t['description']}); {t['n_samples']} test samples (seed {t['seed']}): "
        + ", ".join(f"{q} {n}" for q, n in t["qtypes"].items()),
        f"- machine: {_machine_line(result['machine'])}",
        f"- accuracy: exact match of the greedy answer (batch {s['batch_size']}, left padding); relative = ÷ unpruned",
        f"- latency: batch 1 on one fixed sample, median of {s['repeats']} runs after {s['warmup']} warm-up; "
        "prefill = time to first token (vision encoder + LLM prefill, scoring included); "
        "speedup = unpruned prefill ÷ pruned prefill",
        "- tokens: visual tokens kept per image (mean); eq. avg = equivalent average visual tokens over decoder "
        "layers (in-LLM schedules); FLOPs: LLM prefill (formula in vlm_prune/engine/stats.py); KV: cache after prefill",
        "",
    ]
    head = ["method", "keep", "tokens kept", "eq. avg tokens", "accuracy %", "rel. acc %"]
    head += [f"{q} %" for q in qtypes]
    head += ["prefill GFLOPs", "FLOPs %", "KV MiB", "prefill ms", "speedup", "select ms", "decode ms/tok"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in result["results"]:
        lat = r["latency"]
        keep = r["keep_label"] + (" *" if r.get("note") else "")
        cells = [
            r["method"], keep, _num(r["visual_tokens_kept"]), _num(r["equivalent_average_tokens"]),
            _pct(r["accuracy"]), _pct(r["relative_accuracy"]),
        ]  # fmt: skip
        cells += [_pct(r["per_qtype"].get(q, {}).get("accuracy")) for q in qtypes]
        cells += [
            _num(r["prefill_flops"] / 1e9, "{:.3f}"), _pct(r["flops_ratio"]),
            _num(r["kv_cache_bytes"] / 2**20 if r["kv_cache_bytes"] is not None else None, "{:.2f}"),
            _num(lat["prefill_ms"], "{:.2f}"), _num(r["speedup"], "{:.2f}x"),
            _num(lat["select_ms"], "{:.2f}"), _num(lat["decode_ms_per_token"], "{:.2f}"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ref = result.get("reference")
    if ref:
        lat = ref["latency"]
        lines.append(
            f"Unpruned timing split: vision encoder {_num(lat['vision_ms'], '{:.2f}')} ms + LLM prefill "
            f"{_num(lat['llm_prefill_ms'], '{:.2f}')} ms = {_num(lat['prefill_ms'], '{:.2f}')} ms to first token; "
            f"decode {_num(lat['decode_ms_per_token'], '{:.2f}')} ms per token."
        )
        lines.append("")
    pruned = [r for r in result["results"] if r["method"] != UNPRUNED]
    if pruned:
        lines.append("Selection overhead (scoring time inside the prefill above, median, ms), and the LLM-only part:")
        lines.append("")
        lines.append("| method | keep | select ms | select % of prefill | LLM prefill ms | LLM speedup |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for r in pruned:
            lat = r["latency"]
            share = lat["select_ms"] / lat["prefill_ms"] if lat["prefill_ms"] else None
            lines.append(
                f"| {r['method']} | {r['keep_label']} | {_num(lat['select_ms'], '{:.2f}')} | {_pct(share)} | "
                f"{_num(lat['llm_prefill_ms'], '{:.2f}')} | {_num(r['llm_prefill_speedup'], '{:.2f}x')} |"
            )
        lines.append("")
    notes = [r for r in result["results"] if r.get("note")]
    for r in notes:
        lines.append(f"\\* {r['method']} @ {r['keep_label']}: {r['note']}")
    if notes:
        lines.append("")
    if result["skipped"]:
        lines.append("Skipped:")
        lines.append("")
        for sk in result["skipped"]:
            lines.append(f"- {sk['method']} @ {_keep_label(sk['keep'])} ({sk['status']}): {sk['reason']}")
        lines.append("")
    lines.append(f"Total bench time {result['elapsed_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG with accuracy against visual tokens and speedup against visual tokens, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["results"] if r["method"] != UNPRUNED]
    ref = result.get("reference")
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax_acc, ax_speed = fig.subplots(1, 2)
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["equivalent_average_tokens"] or 0)
        x = [r["equivalent_average_tokens"] for r in rs]
        ax_acc.plot(x, [100 * (r["accuracy"] or 0) for r in rs], marker="o", label=method)
        ax_speed.plot(x, [r["speedup"] or 0 for r in rs], marker="o", label=method)
    if ref:
        ax_acc.axhline(100 * (ref["accuracy"] or 0), color="k", ls="--", lw=1, label="unpruned")
        ax_acc.plot([ref["visual_tokens_kept"]], [100 * (ref["accuracy"] or 0)], "k*", ms=10)
        ax_speed.axhline(1.0, color="k", ls="--", lw=1, label="unpruned")
        ax_speed.plot([ref["visual_tokens_kept"]], [1.0], "k*", ms=10)
    m = result["model"]
    for ax, ylabel in ((ax_acc, "accuracy (%)"), (ax_speed, "prefill speedup (x, batch 1)")):
        ax.set_xlabel("visual tokens (equivalent average over decoder layers)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.set_title(
        f"{m['name']}: accuracy vs tokens ({result['task']['n_samples']} {result['task']['name']} samples)"
    )
    ax_speed.set_title(f"{m['name']}: speedup vs tokens ({result['machine']['gpu'] or 'CPU'})")
    ax_acc.set_ylim(0, 105)
    ax_speed.set_ylim(bottom=0)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write bench_<name>.md/.json/.png into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{result['model']['name']}"
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["markdown"].write_text(result["markdown"])
    data = {k: v for k, v in result.items() if k not in ("markdown", "files")}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    plot(result, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------ schema
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(data: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Validate a bench JSON against `bench_schema.json` (jsonschema when installed, else a small validator
    of the subset the schema uses). Raises ValueError listing the first problem."""
    schema = schema or load_schema()
    try:
        import jsonschema
    except ImportError:
        _validate(data, schema, schema, "$")
        return
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        raise ValueError(f"bench JSON does not follow the schema at {list(e.absolute_path)}: {e.message}") from e


_TYPES = {
    "object": dict, "array": (list, tuple), "string": str, "boolean": bool, "null": type(None),
}  # fmt: skip


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _validate(value, schema: dict, root: dict, where: str) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        node = root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        schema = node
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _validate(value, option, root, where)
                break
            except ValueError as e:
                errors.append(str(e))
        else:
            raise ValueError(f"{where}: matches none of the allowed forms ({'; '.join(errors)})")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_type_ok(value, t) for t in types):
            raise ValueError(f"{where}: expected {' or '.join(types)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        raise ValueError(f"{where}: expected {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                _validate(v, props[key], root, f"{where}.{key}")
            elif extra is False:
                raise ValueError(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                _validate(v, extra, root, f"{where}.{key}")
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise ValueError(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, v in enumerate(value):
                _validate(v, schema["items"], root, f"{where}[{i}]")

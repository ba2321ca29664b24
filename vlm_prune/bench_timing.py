"""Latency measurement of `vlm-prune bench`: prefill (time to first token), the vision encoder on its own, the
selection time, and decode per token, at batch 1, timed round robin so that drifting machine load hits every
configuration alike. On CUDA every timing synchronises the device.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from .bench_report import UNPRUNED
from .errors import PruneError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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


def _pad_id(model) -> int | None:
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    if pad is None and gc is not None:
        eos = getattr(gc, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return pad

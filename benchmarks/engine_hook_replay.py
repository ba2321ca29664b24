"""The engine's hooks alone: one recorded prefill (and decode step) replayed many times, without the model.

`engine_host_time.py` times the hooks inside real generate() calls, where every hook runs between the model's own
layers (cold caches) and, on a shared machine, is preempted by other jobs: its medians move by 2x with the load.
This script isolates the engine's own code path, to compare two versions of it at a glance:

1. one real forward (prefill) and generate() (decode) record the kwargs the handle's hooks receive;
2. the hooks (top-level, vision, language model, rotary, decoder layers, returns) are then called directly with
   fresh copies of those kwargs, `--calls` times, timed with the thread's CPU time; the method's `select` time is
   subtracted, as in the headline benchmark (a second column keeps it: the whole stage, scoring included). A
   decode step replays on a cache cropped back by one token.

It is NOT the issue's measurement (that one stays `engine_host_time.py`); it is an A/B tool for the engine code.

    python benchmarks/engine_hook_replay.py --cells llava:1:random,llava:8:random --calls 300
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from datetime import datetime, timezone

import torch
from engine_host_time import _timed_selects  # next to this script
from speed import keep_all_at  # benchmarks/speed.py, next to this script

import vlm_prune
from vlm_prune.toy_models import build_tiny, make_inputs

CLOCK = time.thread_time
DEFAULT_CELLS = ",".join(f"{f}:{b}:{m}" for f in ("llava", "llava_next", "qwen2_vl") for b in (1, 8)
                         for m in ("keep-all@L0", "random", "fastv"))


def _record(model, handle, call):
    """kwargs of the first call of the model, the language model (and vision tower) and the LM's output."""
    lm, vision = handle.adapter.language_model, handle.adapter.vision_module()
    seen: dict = {}

    def pre(name):
        return lambda module, args, kwargs: (seen.setdefault(name, (args, dict(kwargs))), None)[1]

    hooks = [model.register_forward_pre_hook(pre("model"), with_kwargs=True, prepend=True),
             lm.register_forward_pre_hook(pre("lm"), with_kwargs=True, prepend=True),
             lm.register_forward_hook(_keep_output(seen), with_kwargs=True, prepend=True)]
    if vision is not None:
        hooks.append(vision.register_forward_pre_hook(pre("vision"), with_kwargs=True, prepend=True))
    try:
        call()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _keep_output(seen: dict):
    """A forward hook (run before the handle's, which trims the cache) keeping the output and an untrimmed copy of
    its cache."""
    def hook(module, args, kwargs, output):
        if "out" not in seen:
            seen["out"] = output
            cache = getattr(output, "past_key_values", None)
            seen["cache"] = None if cache is None else copy.deepcopy(cache)

    return hook


def _layer_hooks(handle) -> list:
    """(decoder layer, its hook) in layer order: from the handle's table (attached per forward), or, for engines
    that kept them registered, from the layers."""
    table = getattr(getattr(handle, "_layers", None), "hooks", None)
    if table is not None:
        return [(handle.adapter.layers[index], hook) for index, hook in sorted(table.items())]
    return [(layer, hook) for layer in handle.adapter.layers for hook in layer._forward_pre_hooks.values()
            if "_make_layer_hook" in getattr(hook, "__qualname__", "")]


def _position_embeddings(handle, seen) -> tuple:
    """(cos, sin) for the recorded call's length, computed once outside the timer (model work, not the engine's)."""
    embeds = seen["lm"][1]["inputs_embeds"]
    batch, length = embeds.shape[:2]
    rope = handle.adapter.rope_positions(None, batch, length, 0)
    return handle.adapter.rotary(embeds, rope[0] if handle.adapter.rope_rows == 1 else rope)


def _replay(handle, model, seen, layer_hooks, output, embeddings) -> None:
    """One forward's hooks, in the order the model calls them (the decoder layers get `embeddings`)."""
    lm, adapter = handle.adapter.language_model, handle.adapter
    margs, mkwargs = seen["model"]
    handle._on_model_call(model, margs, dict(mkwargs))
    if "vision" in seen:
        handle._on_vision_call(adapter.vision_module(), seen["vision"][0], dict(seen["vision"][1]))
    largs, lkwargs = seen["lm"]
    kwargs = dict(lkwargs)
    changed = handle._on_lm_call(lm, largs, kwargs)
    kwargs = changed[1] if changed is not None else kwargs
    handle._on_rotary(adapter.rotary, (kwargs["inputs_embeds"], kwargs.get("position_ids")), {})
    hidden = kwargs["inputs_embeds"]
    for layer, hook in layer_hooks:
        layer_kwargs = {"position_embeddings": embeddings, "attention_mask": None,
                        "past_key_values": getattr(output, "past_key_values", None),
                        "position_ids": kwargs["position_ids"]}
        result = hook(layer, (hidden,), layer_kwargs)
        hidden = result[0][0] if result is not None else hidden
    handle._on_lm_return(lm, largs, kwargs, output)
    handle._on_model_return(model, margs, None)


def measure(family: str, batch: int, name: str, calls: int) -> dict:
    model = build_tiny(family)
    inputs = make_inputs(model, batch=batch)
    method = keep_all_at(0) if name == "keep-all@L0" else name
    options = {} if name == "keep-all@L0" else {"keep": 0.25, **({"layer": 3} if family == "qwen3_vl" and
                                                                  name == "fastv" else {})}
    with vlm_prune.pruned(model, method, **options) as handle, torch.no_grad():
        selects = [0.0]
        _timed_selects(handle, selects)
        layer_hooks = _layer_hooks(handle)
        # prefill: one real forward records the kwargs; the cache is copied per replay when stages trim it
        seen = _record(model, handle, lambda: model(**inputs, use_cache=True))
        cache = seen["cache"]
        prefill, with_select, embeddings = [], [], _position_embeddings(handle, seen)
        for index in range(calls + 20):
            output = copy.copy(seen["out"])
            if cache is not None and layer_hooks:
                output.past_key_values = copy.deepcopy(cache)
            selects[0] = 0.0
            started = CLOCK()
            _replay(handle, model, seen, layer_hooks, output, embeddings)
            if index >= 20:
                total = CLOCK() - started
                prefill.append((total - selects[0]) * 1e3)
                with_select.append(total * 1e3)
        # decode: the last step of a generate() call, replayed on its cache cropped back by one token
        steps: dict = {}
        lm = handle.adapter.language_model
        recorder = [model.register_forward_pre_hook(
            lambda m, a, k: (steps.__setitem__("model", (a, dict(k))), None)[1], with_kwargs=True, prepend=True),
            lm.register_forward_pre_hook(
            lambda m, a, k: (steps.__setitem__("lm", (a, dict(k))), None)[1], with_kwargs=True, prepend=True)]
        try:
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        finally:
            for hook in recorder:
                hook.remove()
        step_cache = steps["model"][1].get("past_key_values") or steps["model"][1].get("cache")
        step_cache.crop(-1)
        decode = []
        for index in range(calls * 5 + 100):
            started = CLOCK()
            _replay(handle, model, steps, layer_hooks, {}, embeddings)
            if index >= 100:
                decode.append((CLOCK() - started) * 1e3)
            state = getattr(step_cache, "_vlm_prune_state", None)
            if state is not None:  # the replayed steps do not grow the cache: forget the tokens they recorded
                state.token_chunks.clear()
                state.chunk_width = 0
    return {"prefill_ms": statistics.median(prefill), "prefill_min_ms": min(prefill),
            "with_select_ms": statistics.median(with_select),
            "decode_ms": statistics.median(decode), "decode_min_ms": min(decode)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated family:batch:method")
    parser.add_argument("--calls", type=int, default=300, help="replayed prefills per cell (decode steps: 5x)")
    parser.add_argument("--tag", default="", help="label printed with the results (e.g. the git commit)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import os

    print(f"# {args.tag} {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, load {os.getloadavg()[0]:.2f}")
    print("| cell | prefill median ms | prefill min ms | prefill incl. select median ms | decode median ms | "
          "decode min ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for cell in args.cells.split(","):
        family, batch, name = cell.split(":")
        row = measure(family, int(batch), name, args.calls)
        print(f"| {family} b{batch} {name} | {row['prefill_ms']:.3f} | {row['prefill_min_ms']:.3f} | "
              f"{row['with_select_ms']:.3f} | "
              f"{row['decode_ms']:.4f} | {row['decode_min_ms']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

"""Overhead of ZOO-Prune's zeroth-order sensitivity: linear-first-layer trick vs the naive central
difference vs one projector forward.

Shapes (2-layer GELU MLP projector, m = 64 directions, h = 0.01):
  llava  LLaVA-1.5:  N = 576 tokens, d_in = 1024 (CLIP ViT-L/14-336), d_h = D = 4096
  small  ~100M-scale: N = 196 tokens, d_in = 768 (ViT-B/16 @ 224), d_h = D = 768

Timing: median of `--repeats` (default 5) after `--warmup` (default 1) runs; CUDA events with
synchronisation on GPU, perf_counter on CPU. The projector forward runs in the model dtype (fp32 on
CPU, bf16 on GPU); the sensitivity always computes in fp32 (the module casts a low-precision tail).
The greedy selection (k = 128 of 576, 49 of 196) is timed on its own line.

With `--models llava,qwen2_vl`, it also times ZOO-Prune's whole selection (`handle.stats.select_seconds`:
sensitivity, normalisation and greedy) inside a real forward of the ~100M-parameter random-weight models
of `vlm_prune.toy_models` (576 visual tokens, keep 0.25), for both estimators, against the unpruned
prefill of the same model (one forward with the cache, vision encoder included, and the LLM part alone).

Writes (or updates the section of this device in) benchmarks/results/zoo_overhead.md.

    python benchmarks/zoo_overhead.py                 # CPU
    python benchmarks/zoo_overhead.py --device cuda   # GPU
    python benchmarks/zoo_overhead.py --threads 1 --shapes "" --models llava,qwen2_vl
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed import cpu_model  # benchmarks/speed.py, next to this script
from torch import nn

from vlm_prune.methods.zoo import (
    minmax_normalise,
    sensitivity_diversity_greedy,
    zo_sensitivity,
    zo_sensitivity_naive,
)

SHAPES = {
    "llava": dict(label="LLaVA-1.5 (N=576, d_in=1024, d_h=D=4096)", n=576, d_in=1024, d_h=4096, d=4096, k=128),  # noqa: E501
    "small": dict(label="~100M-scale (N=196, d_in=768, d_h=D=768)", n=196, d_in=768, d_h=768, d=768, k=49),
}
RESULTS = Path(__file__).resolve().parent / "results" / "zoo_overhead.md"




def timer(device: torch.device, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_shape(name: str, device: torch.device, dtype: torch.dtype, m: int, warmup: int, repeats: int) -> dict:
    s = SHAPES[name]
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(s["d_in"], s["d_h"]), nn.GELU(), nn.Linear(s["d_h"], s["d"]))
    projector = projector.to(device=device, dtype=dtype).eval()
    x = torch.randn(s["n"], s["d_in"], device=device, dtype=dtype)
    first, tail = projector[0], projector[1:]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sens = lambda **kw: zo_sensitivity(x, first.weight, first.bias, tail, m, generator=gen(), **kw)  # noqa: E731

    rows: dict[str, tuple[str, Callable[[], object]]] = {
        "proj": (f"projector forward (N rows, {str(dtype).replace('torch.', '')})", lambda: projector(x)),
    }
    if dtype != torch.float32:
        rows["zoo"] = (
            f"**ZOOPrune path**: W1 trick + last-linear split, last product in {str(dtype).replace('torch.', '')}",
            lambda: sens(product_dtype=dtype),
        )
    rows["exact"] = (
        "W1 trick + last-linear split, all fp32" + (" (**ZOOPrune path**)" if dtype == torch.float32 else ""),
        lambda: sens(),
    )
    rows["w1"] = ("W1 trick only, fp32", lambda: sens(split_last_linear=False))
    naive_fn = lambda: zo_sensitivity_naive(x, projector, m, generator=gen())  # noqa: E731
    rows["naive"] = ("naive central difference, fp32 (2mN projector rows)", naive_fn)

    with torch.no_grad():
        z = projector(x)
        scores = minmax_normalise(sens())
        rows["greedy"] = (f"greedy selection, k={s['k']} (default loop)", lambda: select(scores, z, s["k"], None))
        if device.type == "cuda":
            rows["greedy_dev"] = (
                f"greedy selection, k={s['k']} (device loop)",
                lambda: select(scores, z, s["k"], False),
            )
        times = {key: timer(device, fn, warmup, repeats) for key, (_, fn) in rows.items()}
        naive = naive_fn()
        err = lambda got: float(((got - naive).abs() / naive.abs().clamp_min(1e-12)).max())  # noqa: E731
        errors = {"fp32 trick + split": err(sens())}
        if dtype != torch.float32:
            errors[f"ZOOPrune path ({str(dtype).replace('torch.', '')} last product)"] = err(sens(product_dtype=dtype))
        if device.type == "cuda":  # robustness to TF32 matmuls (reference: the fp32 naive result)
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                errors["fp32 trick + split under TF32"] = err(sens())
                errors["naive under TF32"] = err(naive_fn())
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous

    n, d_in, d_h, d = s["n"], s["d_in"], s["d_h"], s["d"]
    flops = {
        "proj": 2 * n * (d_in * d_h + d_h * d),
        "exact": 2 * n * d_in * d_h + 2 * m * d_in * d_h + 2 * m * n * d_h * d,
        "w1": 2 * n * d_in * d_h + 2 * m * d_in * d_h + 2 * 2 * m * n * d_h * d,
        "naive": 2 * 2 * m * n * (d_in * d_h + d_h * d),
    }
    labels = {key: label for key, (label, _) in rows.items()}
    return dict(label=s["label"], labels=labels, times=times, flops=flops, errors=errors)


def run_model(family: str, device: torch.device, warmup: int, repeats: int, m: int) -> dict:
    """Unpruned prefill vs ZOO-Prune's selection time, both estimators, on a ~100M-parameter model."""
    import vlm_prune
    from vlm_prune.methods.zoo import ZOOPrune
    from vlm_prune.toy_models import build_tiny, make_inputs

    model = build_tiny(family, size="bench").to(device).eval()
    inputs = make_inputs(model)
    vision = getattr(model.model, "vision_tower", None) or model.model.visual
    with torch.no_grad():
        prefill = timer(device, lambda: model(**inputs, use_cache=True, logits_to_keep=1), warmup, repeats)
        vision_ms = timer(device, lambda: model.model.get_image_features(**_vision_kwargs(inputs)), warmup, repeats)
    result = {"family": family, "prefill_ms": prefill, "vision_ms": vision_ms, "estimators": {},
              "parameters": sum(p.numel() for p in model.parameters()), "vision_class": type(vision).__name__,
              "tokens": int(inputs["input_ids"].shape[1])}  # fmt: skip
    for estimator in ("moment", "central"):
        method = ZOOPrune(keep=0.25, estimator=estimator, num_directions=m)
        selects, totals = [], []
        with vlm_prune.pruned(model, method) as handle, torch.no_grad():
            for index in range(warmup + repeats):
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                if index >= warmup:
                    totals.append((time.perf_counter() - t0) * 1e3)
                    selects.append(handle.stats.select_seconds * 1e3)
            kept = handle.stats.visual_tokens_out
        result["estimators"][estimator] = {"select_ms": statistics.median(selects),
                                           "pruned_prefill_ms": statistics.median(totals), "kept": kept}  # fmt: skip
    return result


def _vision_kwargs(inputs: dict) -> dict:
    keys = ("pixel_values", "image_grid_thw", "image_sizes")
    return {k: inputs[k] for k in keys if k in inputs}


def render_model(r: dict, header: str, m: int, warmup: int, repeats: int) -> str:
    llm = r["prefill_ms"] - r["vision_ms"]
    lines = [
        f"### {r['family']}: ~{r['parameters'] / 1e6:.0f}M-parameter random-weight model, 576 visual tokens, keep 0.25",
        "",
        header,
        "",
        f"m = {m} directions, h = 0.01; median of {repeats} run(s) after {warmup} warm-up run(s). Prefill = "
        f"one forward with the cache and logits_to_keep=1 ({r['tokens']} tokens): {r['prefill_ms']:.1f} ms, of "
        f"which the vision encoder {r['vision_ms']:.1f} ms and the LLM {llm:.1f} ms.",
        "",
        "| estimator | selection ms | % of unpruned prefill | % of unpruned LLM prefill | pruned prefill ms | target <= 5 % |",  # noqa: E501
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, e in r["estimators"].items():
        pct = 100 * e["select_ms"] / r["prefill_ms"]
        lines.append(
            f"| {name} | {e['select_ms']:.1f} | {pct:.1f} % | {100 * e['select_ms'] / llm:.1f} % | "
            f"{e['pruned_prefill_ms']:.1f} | {'met' if pct <= 5 else '**not met**'} |"
        )
    return "\n".join([*lines, ""])


def select(scores: torch.Tensor, z: torch.Tensor, k: int, host_loop: bool | None) -> torch.Tensor:
    return sensitivity_diversity_greedy(scores, z, k, host_loop=host_loop)


def render(r: dict, header: str, m: int, warmup: int, repeats: int) -> str:
    t, labels, f = r["times"], r["labels"], r["flops"]
    proj = t["proj"]
    best = t.get("zoo", t["exact"])
    lines = [
        f"### {r['label']}",
        "",
        header,
        "",
        f"m = {m} directions, h = 0.01; median of {repeats} run(s) after {warmup} warm-up run(s).",
        "",
        "| what | median ms | x projector forward | GFLOP |",
        "|---|---:|---:|---:|",
    ]
    for key, ms in t.items():
        gflop = f"{f[key] / 1e9:.1f}" if key in f else ""
        if key == "zoo":
            gflop = f"{f['exact'] / 1e9:.1f}"
        lines.append(f"| {labels[key]} | {ms:.2f} | {ms / proj:.1f} | {gflop} |")
    lines += [
        "",
        f"- ZOOPrune path vs naive: **{t['naive'] / best:.2f}x faster**; fp32 trick + split "
        f"{t['naive'] / t['exact']:.2f}x; W1 trick alone {t['naive'] / t['w1']:.2f}x "
        f"(FLOP ratio naive / trick + split = {f['naive'] / f['exact']:.2f})",
        f"- scoring overhead of one media item (sensitivity + greedy): {best + t['greedy']:.2f} ms",
        "- max relative error of S vs the fp32 naive result (same directions): "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()),
        "",
    ]
    return "\n".join(lines)


def update_results(path: Path, key: str, body: str) -> None:
    begin, end = f"<!-- section: {key} -->", f"<!-- end section: {key} -->"
    title = (
        "# ZOO-Prune sensitivity overhead\n\n"
        "Generated by `benchmarks/zoo_overhead.py`. The default path computes W1 x once and W1 u once per\n"
        "direction, and takes the central difference before the projector's last linear layer, so the\n"
        "perturbed batch costs one d_h x D product per direction and token instead of four matmuls. The\n"
        "default estimator (`estimator=\"moment\"`) needs no perturbed batch at all: the mean square of the\n"
        "central differences over the same m directions in closed form, N x d_h x d_h work (see\n"
        "`vlm_prune/methods/zoo.py`); the \"model\" sections time it inside a real forward.\n"
    )
    text = path.read_text() if path.exists() else title
    section = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="llava,small")
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--models", default="", help="e.g. llava,qwen2_vl: the in-model section (see above)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (host CPU: {cpu_model()})"
    else:
        machine = f"{cpu_model()}, {torch.get_num_threads()} threads"
    header = (
        f"{device.type.upper()}: {machine}; torch {torch.__version__}; "
        f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    )
    for name in filter(None, (n.strip() for n in args.shapes.split(","))):
        result = run_shape(name, device, dtype, args.directions, args.warmup, args.repeats)
        body = render(result, header, args.directions, args.warmup, args.repeats)
        update_results(args.out, f"{device.type}:{machine}:{name}", body)
        print(body, flush=True)
    for family in filter(None, (n.strip() for n in args.models.split(","))):
        result = run_model(family, device, args.warmup, args.repeats, args.directions)
        body = render_model(result, header, args.directions, args.warmup, args.repeats)
        update_results(args.out, f"{device.type}:{machine}:model:{family}", body)
        print(body, flush=True)


if __name__ == "__main__":
    main()

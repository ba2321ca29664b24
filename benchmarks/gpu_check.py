"""Equivalence checks of vlm_prune on an accelerator (run by `benchmarks/gpu_check.sh`; CPU works too).

The CPU test suite proves the invariants in float32 on CPU kernels. This script repeats the two that
kernels can break on another device, on every toy family this transformers provides (tiny models) and
on the ~100M-parameter bench models:

* **identity** -- a user `vlm_prune.Method` that keeps every visual token, at layer 0 (pre-LLM) and at
  an in-LLM layer (2; 3 for Qwen3-VL), gives the logits of the unwrapped model at every real position,
  and the same greedy `generate()` tokens (batch 2, left padding);
* **batch** -- `random` at keep 0.5 (pre-LLM) and `fastv` at keep 0.5 (layer 2): each row of a padded
  batch equals that row alone (same kept columns, same logits);
* **SDPA flash** (CUDA, bf16) -- identity at batch 1 with `sdpa_kernel(FLASH_ATTENTION)` alone, pruned greedy
  decoding under it, and the batch check with FLASH + EFFICIENT allowed (padded batches need a mask);
* **syncs** -- `torch.cuda.set_sync_debug_mode("warn")` inside the handle's hooks around one pruned prefill and
  decode step (`vlm_prune.engine.syncs.CudaSyncCounter`): one read of the inputs + one per stage, none per step
  (CPU: the marked-tensor counter of `tests/test_sync_count.py`).

under `attn_implementation` "sdpa" and "eager", in float32 with TF32 off (tolerance atol = rtol = 1e-4;
the CPU tests use 1e-5). "flash_attention_2" runs only if `flash_attn` imports, in bfloat16 (relative
tolerance 2e-2 of the logits' scale); otherwise the report says it was skipped and why.

Writes gpu_check.json and gpu_check.md to --out (default $OUT, else benchmarks/results/tmp/gpu_check).
Exit status 0 if every check that ran passed, 1 otherwise.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cuda
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --quick   # tiny models only (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import vlm_prune  # noqa: E402
from vlm_prune.toy_models import available_families, build_tiny, make_inputs, single_row  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import keep_all_at  # noqa: E402  (benchmarks/speed.py: keep-all methods, the engine's own cost)

FP32_TOL = dict(atol=1e-4, rtol=1e-4)
LOW_PRECISION_REL_TOL = 2e-2
NEW_TOKENS = 6


def in_llm_layer(family: str) -> int:
    return 3 if family == "qwen3_vl" else 2


def real_positions(index: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Positions of row b of a pruned output that hold a real (non-padding) original column."""
    cols = index[b]
    ok = cols >= 0
    ok &= mask[b, cols.clamp(min=0)].bool()
    return ok


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    got, want = got.float(), want.float()
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    if dtype == torch.float32:
        ok = bool(torch.allclose(got, want, **FP32_TOL))
    else:
        scale = float(want.abs().max()) or 1.0
        ok = diff <= LOW_PRECISION_REL_TOL * scale
    return diff, ok


@torch.no_grad()
def greedy(model, inputs) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].cpu()


@torch.no_grad()
def check_identity(model, family: str, dtype: torch.dtype) -> list[dict]:
    inputs = make_inputs(model, batch=2, padding="left")
    mask = inputs["attention_mask"]
    reference = model(**inputs).logits
    ref_tokens = greedy(model, inputs)
    results = []
    for layer in (0, in_llm_layer(family)):
        with vlm_prune.pruned(model, keep_all_at(layer)) as handle:
            logits = model(**inputs).logits
            index = handle.last_kept_index.clone()
            tokens = greedy(model, inputs)
        worst, ok = 0.0, True
        for b in range(2):
            pos = real_positions(index, mask, b)
            diff, good = compare(logits[b][pos], reference[b][index[b][pos]], dtype)
            worst, ok = max(worst, diff), ok and good
        same_tokens = torch.equal(tokens, ref_tokens)
        results.append(dict(check=f"identity keep-all@L{layer}", max_abs_diff=worst, logits_ok=ok,
                            generate_equal=same_tokens, passed=ok and (same_tokens or dtype != torch.float32)))
    return results


@torch.no_grad()
def check_batch(model, family: str, dtype: torch.dtype) -> list[dict]:
    inputs = make_inputs(model, batch=2, padding="left")
    mask = inputs["attention_mask"]
    results = []
    for method in ("random", "fastv"):
        options = {"layer": in_llm_layer(family)} if method == "fastv" else {}
        with vlm_prune.pruned(model, method, keep=0.5, **options) as handle:
            logits = model(**inputs).logits
            index = handle.last_kept_index.clone()
            worst, ok, same_cols = 0.0, True, True
            for b in range(2):
                alone = single_row(inputs, b)
                alone_logits = model(**alone).logits[0]
                alone_index = handle.last_kept_index[0]
                offset = int((~mask[b].bool()).sum())
                pos = real_positions(index, mask, b)
                alone_pos = real_positions(alone_index[None], alone["attention_mask"], 0)
                cols = index[b][pos] - offset
                if not torch.equal(cols.cpu(), alone_index[alone_pos].cpu()):
                    same_cols = False
                    continue
                diff, good = compare(logits[b][pos], alone_logits[alone_pos], dtype)
                worst, ok = max(worst, diff), ok and good
        results.append(dict(check=f"batch row == row alone ({method} keep 0.5)", max_abs_diff=worst,
                            same_kept_columns=same_cols, logits_ok=ok, passed=ok and same_cols))
    return results


def check_flash_sdpa(model, family: str, dtype: torch.dtype) -> list[dict]:
    """Identity at batch 1 under SDPA's FLASH backend alone (no padding, so every attention call of the unwrapped
    and the pruned forward must take the flash kernel or fail), then the batch check with FLASH + EFFICIENT allowed
    (a left-padded batch needs a mask, which flash does not take: its rows alone run flash)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = make_inputs(model, batch=1)
    results = []
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        reference = model(**inputs).logits
        for layer in (0, in_llm_layer(family)):
            with vlm_prune.pruned(model, keep_all_at(layer)) as handle:
                logits = model(**inputs).logits
                index = handle.last_kept_index[0]
            diff, ok = compare(logits[0], reference[0][index], dtype)
            results.append(dict(check=f"identity keep-all@L{layer}, batch 1, FLASH only", max_abs_diff=diff,
                                logits_ok=ok, passed=ok))
        for method in ("random", "fastv"):
            options = {"layer": in_llm_layer(family)} if method == "fastv" else {}
            with vlm_prune.pruned(model, method, keep=0.25, **options):
                tokens = greedy(model, inputs)
            results.append(dict(check=f"{method} keep 0.25 prefill + decode, FLASH only", passed=bool(tokens.numel())))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for row in check_batch(model, family, dtype):
            row["check"] += ", FLASH + EFFICIENT"
            results.append(row)
    return results


def check_syncs(device: torch.device, log) -> list[dict]:
    """The engine's device->host syncs in one pruned prefill and one decode step (a 2-token generate()).

    CUDA: `torch.cuda.set_sync_debug_mode("warn")` inside the handle's hooks only (`CudaSyncCounter`), so every
    synchronizing call is seen, uploads included; CPU: the marked-tensor counter the tests use (`SyncCounter`).
    Bound: one read of the inputs + one per stage in the prefill (Qwen's adapter: + one grid read when generate()
    runs the vision tower before the prefill), none per decode step.
    """
    from vlm_prune.engine.syncs import CudaSyncCounter, SyncCounter, on_device

    rows = []
    for family in ("llava", "qwen2_vl"):
        model = build_tiny(family, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
        for method, options in (("random", {}), ("fastv", {"layer": 2})):
            for batch in (1, 3):
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in make_inputs(model, batch=batch).items()}
                counts: list[int] = []
                with vlm_prune.pruned(model, method, keep=0.25, **options) as handle, torch.no_grad():
                    greedy(model, inputs)  # warm-up, uncounted
                    counter = CudaSyncCounter(handle) if device.type == "cuda" else SyncCounter(handle)
                    call = inputs if device.type == "cuda" else on_device(inputs)
                    with counter:
                        timer = model.register_forward_pre_hook(lambda m, a, c=counter, n=counts: n.append(c.count),
                                                                prepend=True)
                        try:
                            model.generate(**call, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                        finally:
                            timer.remove()
                        counts.append(counter.count)
                    stages = len(handle.stages)
                encode, prefill, decode = counts[0], counts[1] - counts[0], counts[2] - counts[1]
                allowed = 1 + stages + (1 if family.startswith("qwen") else 0)
                ok = encode + prefill <= allowed and decode == 0
                rows.append(dict(check=f"syncs {method} batch {batch}: before prefill {encode}, prefill {prefill}, "
                                       f"decode step {decode} (bound {allowed} / 0)", family=family, passed=ok,
                                 where=[f"{s.call} @ {s.where}" for s in counter.syncs][:12]))
                log(f"{'PASS' if ok else 'FAIL'} {rows[-1]['check']} {family}: {rows[-1]['where']}")
    return rows


LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape


def prefill_timing(device: torch.device, quick: bool, log, repeats: int = 10) -> dict:
    """Prefill speedup of pruning on a compute-bound random LLaVA with a 1.1B Llama LLM (bf16 on CUDA).

    For 1 and 5 images (576 and 2880 visual tokens): the language-model prefill of the unwrapped model, of
    keep-all@L0 (engine overhead), and of random / pool (pre-LLM) and fastv (layer 2) at keep 0.25; the FLOPs
    ideal (`handle.stats`), and the same-length ceiling: the unwrapped model on a text-only input as long as
    what the pre-LLM stage leaves. CUDA events around the forward minus the vision tower (timed alone).
    `quick` (CPU dry run): the tiny LLaVA, 2 repeats, perf_counter.
    """
    import statistics

    from transformers import LlavaForConditionalGeneration

    from vlm_prune.toy_models import build_config

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = build_config("llava", "tiny" if quick else "bench")
    if not quick:
        for key, value in LLAMA_1B.items():
            setattr(config.text_config, key, value)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(device, dtype).eval()
    repeats = 2 if quick else repeats

    def timed(fn) -> float:
        samples = []
        for index in range(repeats + 2):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                begin = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - begin) * 1e3
            if index >= 2:
                samples.append(elapsed)
        return statistics.median(samples)

    rows = []
    for images in (1, 5):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in make_inputs(model, batch=1, num_images=images).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            vision = timed(lambda x=inputs: model.model.get_image_features(pixel_values=x["pixel_values"]))
            base = timed(lambda x=inputs: model(**x, logits_to_keep=1)) - vision
            row = dict(images=images, tokens=int(inputs["input_ids"].shape[1]), vision_ms=vision, unwrapped_ms=base)
            for name, method, options in (("keep-all@L0", keep_all_at(0), {}), ("random", "random", {"keep": 0.25}),
                                          ("pool", "pool", {"keep": 0.25}),
                                          ("fastv", "fastv", {"keep": 0.25, "layer": 2})):
                with vlm_prune.pruned(model, method, **options) as handle:
                    ms = timed(lambda x=inputs: model(**x, logits_to_keep=1)) - vision
                    stats = handle.stats
                    kept_length = int(handle.last_kept_index.shape[1])
                row[name] = dict(ms=ms, speedup=base / ms, ideal=1 / stats.flops_ratio, kept_length=kept_length)
            text = torch.full((1, row["random"]["kept_length"]), 5, dtype=torch.long, device=device)
            ceiling = timed(lambda x=text: model(input_ids=x, logits_to_keep=1))
            row["ceiling_speedup"] = base / ceiling
            row["overhead_pct"] = 100 * (row["keep-all@L0"]["ms"] / base - 1)
        rows.append(row)
        log(f"prefill {images} image(s), {row['tokens']} tokens: unwrapped {base:.2f} ms; "
            + "; ".join(f"{n} {row[n]['ms']:.2f} ms x{row[n]['speedup']:.2f} (ideal x{row[n]['ideal']:.2f})"
                        for n in ("random", "pool", "fastv"))
            + f"; same-length ceiling x{row['ceiling_speedup']:.2f}; engine overhead {row['overhead_pct']:.1f} %")
    return dict(model="LLaVA, random weights, " + ("tiny" if quick else "1.1B Llama LLM (TinyLlama shape)"),
                dtype=str(dtype), timer="CUDA events" if cuda else "perf_counter", repeats=repeats, rows=rows)


def run_case(family: str, size: str, attn: str, dtype: torch.dtype, device: torch.device, log) -> list[dict]:
    label = dict(family=family, size=size, attn=attn, dtype=str(dtype).replace("torch.", ""))
    t0 = time.perf_counter()
    try:
        if attn == "sdpa-flash":  # SDPA's own flash kernel (torch.nn.attention), not the flash-attn package
            model = build_tiny(family, size=size, attn_implementation="sdpa", dtype=dtype).to(device)
            rows = check_flash_sdpa(model, family, dtype)
        else:
            model = build_tiny(family, size=size, attn_implementation=attn, dtype=dtype).to(device)
            rows = check_identity(model, family, dtype) + check_batch(model, family, dtype)
    except Exception as exc:  # report and go on: one broken case must not hide the others
        rows = [dict(check="(setup or check raised)", passed=False, error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc()[-3000:])]
    seconds = time.perf_counter() - t0
    for row in rows:
        row.update(label)
        row["seconds"] = round(seconds, 1)
        status = "PASS" if row["passed"] else "FAIL"
        extra = f" max|diff| {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else f" {row.get('error', '')}"
        log(f"{status} {family}/{size}/{attn}/{label['dtype']}: {row['check']}{extra}")
    return rows


def render(report: dict) -> str:
    env = report["environment"]
    lines = ["# vlm_prune device check", "",
             f"- device: {env['device']} ({env.get('gpu', env.get('cpu', ''))}); torch {env['torch']}, "
             f"transformers {env['transformers']}; TF32 matmul off for float32 checks",
             f"- flash_attn: {env['flash_attn']}",
             f"- {report['passed']} of {report['total']} checks passed in {report['seconds']:.0f} s "
             f"(cases done: {report['cases_done']})", "",
             "| family | size | attn | dtype | check | max abs diff | result |",
             "|---|---|---|---|---|---:|---|"]
    for r in report["results"]:
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
        result = "pass" if r["passed"] else "**FAIL** " + (r.get("error") or "").replace("|", "/")[:200]
        if r.get("generate_equal") is False:
            result += " (greedy tokens differ)"
        if r.get("same_kept_columns") is False:
            result += " (kept columns differ)"
        lines.append(f"| {r['family']} | {r['size']} | {r['attn']} | {r['dtype']} | {r['check']} | {diff} | "
                     f"{result} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models only (skip the bench-size models)")
    parser.add_argument("--no-syncs", action="store_true", help="skip the sync-count step")
    parser.add_argument("--prefill", action="store_true",
                        help="run only the prefill timing on a 1.1B-LLM LLaVA (-> prefill_timing.json)")
    parser.add_argument("--only-syncs", action="store_true", help="run only the sync-count step")
    parser.add_argument("--out", default=None,
                        help="output folder (default $OUT, else benchmarks/results/tmp/gpu_check)")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results" / "tmp" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    import transformers

    env = dict(device=str(device), torch=torch.__version__, transformers=transformers.__version__,
               families=available_families())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = f"imports (version {getattr(flash_attn, '__version__', '?')})"
        have_flash = True
    except Exception as exc:  # ImportError, or a broken build raising something else
        env["flash_attn"] = f"does not import ({type(exc).__name__}: {exc}); flash_attention_2 checks skipped"
        have_flash = False
    log(f"environment: {env}")

    cases = [(family, "tiny", attn, torch.float32) for family in env["families"] for attn in ("sdpa", "eager")]
    if not args.quick:
        cases += [(family, "bench", attn, torch.float32) for family in ("llava", "qwen2_vl")
                  for attn in ("sdpa", "eager")]
    if have_flash and device.type == "cuda":
        cases += [(family, "tiny", "flash_attention_2", torch.bfloat16) for family in env["families"]]
        if not args.quick:
            cases += [(family, "bench", "flash_attention_2", torch.bfloat16) for family in ("llava", "qwen2_vl")]
    else:
        log(f"flash_attention_2: skipped -- flash_attn {env['flash_attn']}"
            if not have_flash else "flash_attention_2: skipped -- needs CUDA")
    if device.type == "cuda":  # SDPA's flash backend in bf16: what this machine verifies without flash-attn
        cases += [(family, "tiny", "sdpa-flash", torch.bfloat16) for family in ("llava", "qwen2_vl", "llava_next")]

    if args.prefill:
        timing = prefill_timing(device, args.quick, log)
        timing["environment"] = env
        (out / "prefill_timing.json").write_text(json.dumps(timing, indent=1))
        log(f"wrote {out / 'prefill_timing.json'}")
        return 0
    if args.only_syncs:
        cases = []
    results: list[dict] = []
    report: dict = {}
    for number, case in enumerate(cases, 1):
        results += run_case(*case, device, log)
        passed = sum(r["passed"] for r in results)
        report = dict(environment=env, results=results, passed=passed, total=len(results),
                      cases_done=f"{number}/{len(cases)}", seconds=time.perf_counter() - started)
        # written after every case, so a run cut short by a time limit still reports what it checked
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(render(report))
    if not args.no_syncs:
        for row in check_syncs(device, log):
            row.update(size="tiny", attn="sdpa", dtype="bfloat16" if device.type == "cuda" else "float32")
            results.append(row)
        passed = sum(r["passed"] for r in results)
        report = dict(environment=env, results=results, passed=passed, total=len(results),
                      cases_done=report.get("cases_done", "0/0") + " + syncs", seconds=time.perf_counter() - started)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.md").write_text(render(report))
    log(f"{report['passed']}/{report['total']} checks passed; wrote {out / 'gpu_check.md'} and gpu_check.json")
    return 0 if report["passed"] == report["total"] else 1


if __name__ == "__main__":
    sys.exit(main())

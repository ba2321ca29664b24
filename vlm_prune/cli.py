"""The `vlm-prune` command (also `python -m vlm_prune`).

vlm-prune demo                       # the main job: embedded LLaVA, answers with/without pruning, quick bench
vlm-prune bench --model qwen2_vl     # accuracy and speed of every method at 1.0/192/128/64 tokens
vlm-prune methods                    # registered pruning methods
vlm-prune models                     # supported model families and the embedded demo models
vlm-prune calibrate --model llava    # propose AdaptInfer pruning layers and save a preset
vlm-prune video --sampler bolt       # VideoQA: a video file and a question, answered with fewer tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the hand-written layout of descriptions/epilogs and shows the defaults (unless the help states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


TOP_DESCRIPTION = _dedent(
    """
    vlm-prune: training-free visual-token pruning for Hugging Face vision-language models.

    Prunes the visual tokens of a LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL model in place
    (vlm_prune.apply(model, "fastv", keep=64)) and measures what that costs in accuracy and saves in time.
    Everything here runs offline on CPU with the two small embedded demo models.
    """
)
TOP_EPILOG = _dedent(
    """
    examples:
      vlm-prune demo                                   start here: answers with and without pruning, then a quick bench
      vlm-prune bench --quick                          every method on the embedded LLaVA, in under 3 minutes
      vlm-prune bench --model qwen2_vl --methods fastv,divprune --keeps 1.0 128 64
      vlm-prune bench --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bfloat16
      vlm-prune methods
      vlm-prune calibrate --model llava --keep 0.5 --out adaptinfer_llava.json
      vlm-prune video clip.mp4 --question "what happens?" --method evs --keep 0.25 --sampler bolt

    Run `vlm-prune <command> --help` for the options of each command.
    """
)

MODEL_HELP = (
    "the model: 'llava', 'qwen2_vl', 'qwen2_vl_video' or 'llava_icl' (embedded demo models, offline), a local folder "
    "saved with "
    "save_pretrained, or a Hugging Face hub id"
)


# ------------------------------------------------------------------------------------------------ parser
def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = "llava") -> None:
    by_task = " (default: llava for --task mosaic, qwen2_vl_video for --task video, llava_icl for --task icl)"
    p.add_argument("--model", default=default_model, help=MODEL_HELP + ("" if default_model else by_task))
    p.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with --quick and in demo, else torch's own setting); "
        "1 gives steady timings on a CPU shared with other work",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test samples and of random methods")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from vlm_prune.bench import DEFAULTS, QUICK, TASKS

    p.add_argument(
        "--task",
        default="mosaic",
        choices=sorted(TASKS),
        help="evaluation task: mosaic (images; default model llava) or video (clips; default model qwen2_vl_video)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names or 'a+b' compositions (see `vlm-prune methods`); default: all registered",
    )
    p.add_argument(
        "--keeps",
        nargs="+",
        default=None,
        help="budgets: ints = visual tokens kept per image (video), floats = fractions; 1.0 = the unpruned "
        "reference (always run). Default mosaic 1.0 192 128 64 (with --quick: "
        + " ".join(map(str, QUICK["keeps"]))
        + "), video 1.0 0.5 0.25 0.1 (PruneVid also at its own budget)",
    )
    p.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help=f"test samples per method and budget (default {DEFAULTS['n_samples']}; --quick {QUICK['n_samples']})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per latency, median reported (default {DEFAULTS['repeats']}; --quick {QUICK['repeats']})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed warm-up runs (default {DEFAULTS['warmup']}; --quick {QUICK['warmup']})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size of the accuracy runs (default {DEFAULTS['batch_size']})",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens generated per answer (default {DEFAULTS['max_new_tokens']})",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help=f"tokens generated to time decoding (default {DEFAULTS['decode_tokens']}; "
        f"--quick {QUICK['decode_tokens']}; 0 = skip)",
    )
    p.add_argument("--quick", action="store_true", help="small run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out-dir", default="bench_results", help="where bench_<model>.md/.json/.png are written")
    p.add_argument("--name", default=None, help="file stem of the outputs (default: from --model)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-prune", description=TOP_DESCRIPTION, epilog=TOP_EPILOG, formatter_class=_Formatter
    )
    from vlm_prune import __version__

    parser.add_argument("--version", action="version", version=f"vlm-prune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    demo = sub.add_parser(
        "demo",
        help="the main job: answer test mosaics with and without pruning, then a quick bench",
        description=_dedent(
            """
            Loads the embedded LLaVA (a small real LlavaForConditionalGeneration trained on the mosaic task,
            576 visual tokens per image), answers a few held-out test mosaics unpruned and pruned, shows each
            question with the true answer and both model answers, then runs the quick bench of every method
            and prints its table. No network, no GPU.
            """
        ),
        epilog=_dedent(
            """
            examples:
              vlm-prune demo
              vlm-prune demo --method fastv --keep 128 --n 6
              vlm-prune demo --model qwen2_vl --no-bench --save-images demo_images
            """
        ),
        formatter_class=_Formatter,
    )
    _add_model_args(demo)
    demo.add_argument("--method", default="divprune", help="method for the side-by-side answers")
    demo.add_argument(
        "--keep", default="64", help="its budget: an int = visual tokens kept per image, a float = fraction"
    )
    demo.add_argument("--n", type=int, default=8, help="test mosaics answered side by side")
    demo.add_argument("--save-images", default=None, metavar="DIR", help="also save those mosaics as PNG files")
    demo.add_argument("--no-bench", action="store_true", help="skip the quick bench")
    demo.add_argument("--out-dir", default="bench_results", help="where the quick bench writes its files")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    bench = sub.add_parser(
        "bench",
        help="accuracy kept vs visual tokens kept, FLOPs, KV cache and speedup of every method",
        description=_dedent(
            """
            Runs every method (default: all registered) at every budget (default 1.0 / 192 / 128 / 64 visual
            tokens per image; 1.0 = the unpruned model) on a task (default: held-out mosaic test samples) and
            reports accuracy and accuracy relative to unpruned (overall and per question type), visual tokens
            kept and equivalent average tokens (in-LLM schedules), LLM prefill FLOPs, KV-cache bytes, prefill
            latency at batch 1 (median of repeats after warm-up) with its speedup, the selection overhead on
            its own column, and decode time per token. Methods that cannot run on the model (they raise a
            vlm_prune.PruneError) are skipped with the reason.

            Writes <out-dir>/bench_<model>.md (table), .json (schema: vlm_prune/bench_schema.json) and .png
            (accuracy vs tokens, speedup vs tokens), and prints the table.
            """
        ),
        epilog=_dedent(
            """
            examples:
              vlm-prune bench --quick                                   embedded LLaVA, < 3 minutes on 2 CPU cores
              vlm-prune bench --model qwen2_vl --out-dir results
              vlm-prune bench --methods fastv,random --keeps 1.0 0.25 --n-samples 100
              vlm-prune bench --model ./my_llava_folder --device cuda --dtype float16
            """
        ),
        formatter_class=_Formatter,
    )
    _add_model_args(bench, default_model=None)
    _add_bench_args(bench)

    methods = sub.add_parser(
        "methods",
        help="list the registered pruning methods",
        description="Lists the registered pruning methods with a one-line summary each. Use a name with "
        "vlm_prune.apply(model, name, keep=...) or `vlm-prune bench --methods name`; join names with '+' to "
        "compose a pre-LLM and an in-LLM method.",
        epilog="example:\n  vlm-prune methods\n  vlm-prune methods --json",
        formatter_class=_Formatter,
    )
    methods.add_argument("--json", action="store_true", help="print {name: summary} as JSON")

    models = sub.add_parser(
        "models",
        help="list the supported model families and the embedded demo models",
        description="Lists the transformers model classes vlm_prune has an adapter for (load them with "
        "AutoModelForImageTextToText) and the embedded demo models usable offline as --model.",
        epilog="example:\n  vlm-prune models",
        formatter_class=_Formatter,
    )
    models.add_argument("--json", action="store_true", help="print as JSON")

    cal = sub.add_parser(
        "calibrate",
        help="measure cross-modal attention per layer and save an AdaptInfer (or AdaToken-3D) preset",
        description=_dedent(
            """
            Runs the model (eager attention, for this offline measurement only) on a few task samples, measures
            per decoder layer the share of the text queries' attention that lands on visual tokens, picks the
            layers where it shifts most (inflection layers), proposes an AdaptInfer schedule for --keep and
            saves it as a JSON preset. Use it with
                vlm_prune.apply(model, "adaptinfer", preset="<out>.json")
            With --method adatoken3d it does AdaToken-3D's tailoring instead (attention rows recomputed from q/k,
            no eager): per layer, the share of the last instruction token's attention that flows into the
            spatial tokens and the fraction of them carrying under --mass (5 %) of it; it proposes the stage
            layers and keep ratios that need the fewest tokens, for
                vlm_prune.apply(model, "adatoken3d", preset="<out>.json")
            """
        ),
        epilog=_dedent(
            """
            examples:
              vlm-prune calibrate --model llava --out adaptinfer_llava.json
              vlm-prune calibrate --model qwen2_vl --keep 0.5 --n-stages 2 --n-samples 16
              vlm-prune calibrate --method adatoken3d --model llava3d_scene --task scene3d --out at3d.json
            """
        ),
        formatter_class=_Formatter,
    )
    _add_model_args(cal)
    cal.add_argument("--method", choices=("adaptinfer", "adatoken3d"), default="adaptinfer", help="what to calibrate")
    cal.add_argument(
        "--task", default=None, help="task whose test samples are used (default: mosaic, scene3d for adatoken3d)"
    )
    cal.add_argument("--mass", type=float, default=0.05, help="adatoken3d: attention mass that counts as 'low'")
    cal.add_argument("--n-samples", type=int, default=8, help="samples to measure on")
    cal.add_argument("--keep", type=float, default=0.5, help="equivalent average fraction of visual tokens to keep")
    cal.add_argument("--n-stages", type=int, default=3, help="pruning stages to place")
    cal.add_argument("--min-gap", type=int, default=None, help="min layers between stages (default max(1, L // 2n))")
    cal.add_argument("--out", default=None, help="preset path (default adaptinfer_<model>.json)")
    from vlm_prune.video.cli_video import add_parser as add_video_parser

    add_video_parser(sub, _Formatter)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _parse_keep(text: str) -> float | int:
    text = str(text).strip()
    return int(text) if text.isdigit() else float(text)


def _set_threads(threads: int | None, default: int | None) -> None:
    import torch

    value = threads if threads is not None else default
    if value:
        torch.set_num_threads(int(value))


def _cells_text(sample) -> list[str]:
    cells = getattr(sample, "cells", None)
    grid = getattr(sample, "grid", 3)
    if not cells:
        return []
    rows = []
    for r in range(grid):
        rows.append(" | ".join(f"{c.color + ' ' + c.shape:<16}" for c in cells[r * grid : (r + 1) * grid]))
    return rows


def cmd_demo(args) -> int:
    import torch

    import vlm_prune
    from vlm_prune.bench import load_bench_model, run_bench
    from vlm_prune.data.mosaic import make_mosaics
    from vlm_prune.demo import generate_answers, normalize_answer

    _set_threads(args.threads, 1)
    keep = _parse_keep(args.keep)
    t0 = time.perf_counter()
    model, processor, _ = load_bench_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    n_visual = None
    print(
        f"Loaded {args.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters ({time.perf_counter() - t0:.1f} s)"
    )
    samples = make_mosaics("test", args.n, seed=args.seed)
    if args.save_images:
        out = Path(args.save_images)
        out.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(samples):
            s.image.save(out / f"mosaic_{i}.png")
        print(f"Saved the {len(samples)} mosaics to {out}/mosaic_<i>.png")
    images, questions = [s.image for s in samples], [s.question for s in samples]
    t = time.perf_counter()
    plain = generate_answers(model, processor, images, questions)
    t_plain = time.perf_counter() - t
    with vlm_prune.pruned(model, args.method, keep=keep, seed=args.seed) as handle:
        t = time.perf_counter()
        cut = generate_answers(model, processor, images, questions)
        t_cut = time.perf_counter() - t
        stats = handle.stats
        n_visual = stats.visual_tokens_in // max(len(samples), 1)
        n_kept = stats.visual_tokens_out / max(len(samples), 1)
    print(
        f"\n{len(samples)} held-out test mosaics, unpruned ({n_visual} visual tokens each) vs "
        f"{args.method} keep={keep} ({n_kept:.0f} kept):\n"
    )
    ok_plain = ok_cut = 0
    label = f"{args.method}@{keep}"
    for i, (s, a, b) in enumerate(zip(samples, plain, cut)):
        truth = normalize_answer(s.answer)
        pa, pb = normalize_answer(a) or "(nothing)", normalize_answer(b) or "(nothing)"
        ok_plain += pa == truth
        ok_cut += pb == truth
        print(f"[{i}] Q: {s.question}   ({s.qtype} question)")
        for r, line in enumerate(_cells_text(s)):
            print(f"    {'mosaic: ' if r == 0 else ' ' * 8}{line}".rstrip())
        ma, mb = ("ok" if x == truth else "WRONG" for x in (pa, pb))
        print(f"    true answer: {truth:<10} unpruned: {pa:<10} {ma:<6} {label}: {pb:<10} {mb}")
        print()
    n = len(samples)
    print(
        f"\nunpruned {ok_plain}/{n} correct in {t_plain:.2f} s; {args.method}@{keep}: {ok_cut}/{n} correct in "
        f"{t_cut:.2f} s (batch {n}, generate)"
    )
    print(str(stats))
    if args.no_bench:
        return 0
    print("\nQuick bench of every method (accuracy on held-out mosaics, batch-1 prefill speed):\n")
    result = run_bench(
        args.model,
        quick=True,
        out_dir=args.out_dir,
        seed=args.seed,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads or 1,
        model=model,
        processor=processor,
    )
    result["model"]["source"] = "embedded" if args.model in ("llava", "qwen2_vl") else result["model"]["source"]
    print(result["markdown"])
    files = result.get("files", {})
    if files:
        print("Wrote " + ", ".join(files.values()))
    return 0


def cmd_bench(args) -> int:
    from vlm_prune.bench import run_bench

    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kwargs = {}
    if args.keeps:
        kwargs["keeps"] = [_parse_keep(k) for k in args.keeps]
    result = run_bench(
        args.model,
        task=args.task,
        methods=methods,
        n_samples=args.n_samples,
        repeats=args.repeats,
        quick=args.quick,
        out_dir=args.out_dir,
        seed=args.seed,
        progress=not args.no_progress,
        warmup=args.warmup,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        decode_tokens=args.decode_tokens,
        device=args.device,
        dtype=args.dtype,
        name=args.name,
        threads=args.threads,
        **kwargs,
    )
    print(result["markdown"])
    files = result.get("files", {})
    if files:
        print("Wrote " + ", ".join(files.values()))
    return 0


def cmd_methods(args) -> int:
    import vlm_prune

    available = vlm_prune.methods()
    if args.json:
        print(json.dumps(available, indent=2))
        return 0
    width = max(map(len, available), default=0)
    print("Registered pruning methods (use with vlm_prune.apply(model, NAME, keep=...); compose with '+'):\n")
    for name, summary in available.items():
        print(f"  {name:<{width}}  {summary}")
    return 0


def cmd_models(args) -> int:
    import vlm_prune
    from vlm_prune.demo import DEMO_MODELS, demo_model_path

    supported = vlm_prune.supported_models()
    embedded = {name: str(demo_model_path(name)) for name in DEMO_MODELS}
    if args.json:
        print(json.dumps({"supported": supported, "embedded": embedded}, indent=2))
        return 0
    width = max(map(len, supported), default=0)
    print("Supported model classes (load with transformers.AutoModelForImageTextToText):\n")
    for cls, family in supported.items():
        print(f"  {cls:<{width}}  {family}")
    print("\nEmbedded demo models (offline, --model NAME):\n")
    for name, path in embedded.items():
        missing = "  (missing: rebuild with benchmarks/train_demo_models.py)"
        present = "" if (Path(path) / "config.json").is_file() else missing
        print(f"  {name:<10} {path}{present}")
    return 0


def cmd_calibrate(args) -> int:
    import torch

    from vlm_prune.bench import _short_name, load_bench_model
    from vlm_prune.bench_tasks import get_task
    from vlm_prune.calibrate_runner import calibrate
    from vlm_prune.methods.adaptinfer import Schedule
    from vlm_prune.methods.calibration import save_preset

    args.task = args.task or ("scene3d" if args.method == "adatoken3d" else "mosaic")
    task = get_task(args.task)
    _set_threads(args.threads, None)
    load = task.load_model or load_bench_model
    model, processor, _ = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    samples = task.samples(args.n_samples, args.seed)
    inputs = [task.prepare(model, processor, [s]) for s in samples]
    if args.method == "adatoken3d":
        return _calibrate_adatoken3d(args, model, inputs)
    with torch.no_grad():
        found = calibrate(model, inputs, keep=args.keep, n_stages=args.n_stages, min_gap=args.min_gap)
    sched = found["schedule"]
    schedule = Schedule(tuple(sched["layers"]), tuple(sched["keep"]), sched.get("source") or "calibrated")
    out = Path(args.out or f"adaptinfer_{_short_name(args.model)}.json")
    save_preset(
        out,
        schedule,
        model=found["model"] or args.model,
        num_layers=found["num_layers"],
        shares=found["shares"],
        inflection=found["inflection_layers"],
        keep=args.keep,
        extra={"task": args.task, "samples": found["samples"], "seed": args.seed},
    )
    print(f"Cross-modal attention share per decoder layer ({found['samples']} samples):")
    for layer, share in enumerate(found["shares"]):
        print(f"  layer {layer:>3}: {share:.3f} {'#' * int(round(40 * share))}")
    print(f"Inflection layers: {found['inflection_layers']}")
    keeps = ", ".join(f"{k:.3f}" if isinstance(k, float) else str(k) for k in schedule.keep)
    print(
        f"Proposed AdaptInfer schedule for keep={args.keep}: prune on the input of layers {list(schedule.layers)}, "
        f"keeping {keeps} of the visual tokens after each stage"
    )
    print(f"Saved preset {out}; use it with vlm_prune.apply(model, 'adaptinfer', preset={str(out)!r})")
    return 0


def _calibrate_adatoken3d(args, model, inputs) -> int:
    import torch

    from vlm_prune.bench import _short_name
    from vlm_prune.calibrate_runner import calibrate_adatoken3d
    from vlm_prune.methods.adaptinfer import Schedule
    from vlm_prune.methods.adatoken3d import save_preset

    with torch.no_grad():
        found = calibrate_adatoken3d(model, inputs, n_stages=args.n_stages, mass=args.mass)
    sched = found["schedule"]
    schedule = Schedule(tuple(sched["layers"]), tuple(sched["keep"]), "calibrated")
    out = Path(args.out or f"adatoken3d_{_short_name(args.model)}.json")
    measured = {k: found[k] for k in ("num_layers", "keep", "samples", "shares", "low_fractions", "needed", "mass")}
    save_preset(out, schedule, model=found["model"] or args.model, task=args.task, seed=args.seed, **measured)
    print(f"Last instruction token's attention per decoder layer ({found['samples']} samples):")
    for layer, (share, low) in enumerate(zip(found["shares"], found["low_fractions"])):
        print(f"  layer {layer:>3}: {share:.3f} into spatial tokens, {100 * low:5.1f} % of them under {args.mass:.0%}")
    keeps = ", ".join(f"{k:.3f}" for k in schedule.keep)
    print(
        f"Proposed AdaToken-3D schedule: prune on the input of layers {list(schedule.layers)}, keeping {keeps} of "
        f"the spatial tokens after each stage (equivalent average {found['keep']:.3f})"
    )
    print(f"Saved preset {out}; use it with vlm_prune.apply(model, 'adatoken3d', preset={str(out)!r})")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "bench": cmd_bench,
    "methods": cmd_methods,
    "models": cmd_models,
    "calibrate": cmd_calibrate,
    "video": lambda args: __import__("vlm_prune.video.cli_video", fromlist=["run"]).run(args),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `vlm-prune` and `python -m vlm_prune`; returns the exit status."""
    from vlm_prune.errors import PruneError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except PruneError as e:
        print(f"vlm-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

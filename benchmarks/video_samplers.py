"""Frame choice x pruning on the embedded video task: uniform / clip_topk / bolt / aks at 8 and 16 frames, crossed
with EVS and random pruning, through `vlm_prune.pipelines.VideoQA` on the embedded Qwen2-VL video model.

Setup
- Clips: `vlm_prune.tasks.video.make_clips("test", n, seed, frames_per_step=F)`: 4 states of F identical
  frames each (default F = 8: 32-frame source clips), so that choosing 8 or 16 frames is a real choice. The
  model was trained on 2 and 4 frames per state (8- and 16-frame clips); uniform choice of 8 / 16 of 32 frames
  gives exactly those clips back.
- Relevance: `FrameChangeScorer` (how much a frame differs from the one before; no weights). No pretrained
  CLIP can be loaded offline here, and a random CLIP would score noise. Every frame of the source clip is a
  candidate (score_fps = fps).
- Each (sampler, frames) runs unpruned and with each method at each keep; answers are greedy, batch 1, exact
  match of the first word. "states seen" counts the clip's 4 states that have at least one chosen frame.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/video_samplers.py [--n 100] [--out benchmarks/results]

Writes video_samplers.json (after every cell, so a stopped run keeps what it reached), .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

SAMPLERS = ("uniform", "clip_topk", "bolt", "aks")
RUNS = (("none", None), ("evs", 0.5), ("evs", 0.25), ("random", 0.5), ("random", 0.25))
FPS = 2.0  # the clips' nominal fps; candidates are scored at this rate, i.e. every frame


def _label(method: str, keep: float | None) -> str:
    return "unpruned" if method == "none" else f"{method} {keep}"


def run_cell(model, processor, samples, sampler: str, k: int, method: str, keep, fps_step: int, bar) -> dict:
    from vlm_prune.pipelines import Frames, VideoQA
    from vlm_prune.tasks.video import STEPS
    from vlm_prune.tasks.video_processing import score
    from vlm_prune.video.scorers import FrameChangeScorer

    scorer = None if sampler == "uniform" else FrameChangeScorer()
    qa = VideoQA(model, processor, method=method, keep=keep, num_frames=k, sampler=sampler, scorer=scorer,
                 score_fps=FPS, max_new_tokens=4)  # fmt: skip
    answers, kept, requested, seen, frames, seconds = [], [], [], [], [], []
    for s in samples:
        n = len(s.video)
        result = qa.answer(Frames(s.video, list(range(n)), fps=FPS, total_frames=n), s.question)
        answers.append(result.text)
        kept.append(result.stats.tokens_kept)
        requested.append(result.stats.tokens_requested)
        seen.append(len({i // fps_step for i in result.frames}))
        frames.append(result.frames)
        seconds.append(result.stats.seconds)
        bar.update(1)
    scored = score(answers, samples)
    return {
        "sampler": sampler, "frames": k, "method": method, "keep": keep, "label": _label(method, keep),
        "accuracy": scored["accuracy"], "per_qtype": {q: v["accuracy"] for q, v in scored["per_qtype"].items()},
        "tokens_kept": float(np.mean(kept)), "tokens_requested": float(np.mean(requested)),
        "states_seen": float(np.mean(seen)), "all_states_seen": float(np.mean([v == STEPS for v in seen])),
        "seconds": {key: float(np.mean([t[key] for t in seconds])) for key in seconds[0]},
        "frames_chosen": frames[:5], "answers": answers,
    }  # fmt: skip


def write_report(out: Path, meta: dict, cells: list[dict]) -> None:
    (out / "video_samplers.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    labels = list(dict.fromkeys(c["label"] for c in cells))
    lines = [
        "## Frame choice x pruning on the embedded video task (VideoQA, embedded Qwen2-VL video model)",
        "",
        f"- clips: {meta['n']} held-out test clips (seed {meta['seed']}), {meta['source_frames']} frames each "
        f"(4 states x {meta['frames_per_step']} frames); the model sees 8 or 16 of them",
        "- relevance for clip_topk / bolt / aks: FrameChangeScorer (mean absolute difference to the previous "
        "frame; no pretrained CLIP is loadable offline), every frame a candidate",
        f"- machine: {meta['machine']}; load average {meta['load_start']} at start, {meta['load_end']} at end "
        f"(shared by 8 engineers); one process, 1 thread, nice 10; {meta['minutes']:.1f} min",
        "- accuracy: exact match of the greedy first word, batch 1; states seen: of the 4 states, how many have "
        "a chosen frame (all: share of clips with all 4)",
        "",
    ]
    for k in meta["frame_counts"]:
        lines += [f"### {k} frames", "", "| sampler | states seen | all seen % | " + " | ".join(
            f"{lab} %" for lab in labels) + " |", "|---|---:|---:|" + "---:|" * len(labels)]  # fmt: skip
        for sampler in meta["samplers"]:
            row = {c["label"]: c for c in cells if c["frames"] == k and c["sampler"] == sampler}
            if not row:
                continue
            first = next(iter(row.values()))
            accs = " | ".join(f"{100 * row[lab]['accuracy']:.0f}" if lab in row else "" for lab in labels)
            lines.append(f"| {sampler} | {first['states_seen']:.2f} | {100 * first['all_states_seen']:.0f} | {accs} |")
        toks = {c["label"]: (c["tokens_requested"], c["tokens_kept"]) for c in cells if c["frames"] == k}
        lines += ["", "tokens (requested / kept, mean per clip): " + "; ".join(
            f"{lab} {r:.0f} / {kp:.0f}" for lab, (r, kp) in toks.items()), ""]  # fmt: skip
    lines += ["### Per question type (%)", "", "| frames | sampler | run | " + " | ".join(meta["qtypes"]) + " |",
              "|---:|---|---|" + "---:|" * len(meta["qtypes"])]  # fmt: skip
    for c in cells:
        per = " | ".join(f"{100 * c['per_qtype'].get(q, float('nan')):.0f}" for q in meta["qtypes"])
        lines.append(f"| {c['frames']} | {c['sampler']} | {c['label']} | {per} |")
    if meta.get("notes"):
        lines += ["", "### What this shows", "", meta["notes"]]
    (out / "video_samplers.md").write_text("\n".join(lines) + "\n")
    _plot(out / "video_samplers.png", meta, cells, labels)


def _plot(path: Path, meta: dict, cells: list[dict], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = meta["frame_counts"]
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, k in zip(axes[0], counts):
        for j, lab in enumerate(labels):
            ys = [next((c["accuracy"] * 100 for c in cells if (c["frames"], c["sampler"], c["label"]) == (k, s, lab)),
                       np.nan) for s in meta["samplers"]]  # fmt: skip
            ax.bar(np.arange(len(meta["samplers"])) + (j - (len(labels) - 1) / 2) * width, ys, width, label=lab)
        ax.set_xticks(range(len(meta["samplers"])), meta["samplers"])
        ax.set_title(f"{k} of {meta['source_frames']} frames")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("embedded video task: frame sampler x pruning (VideoQA, FrameChangeScorer relevance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames-per-step", type=int, default=8, help="source frames per clip state")
    parser.add_argument("--frame-counts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--notes", default=None, help="text for the report's 'What this shows' section")
    parser.add_argument("--report-only", action="store_true", help="rewrite .md/.png from the .json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        data = json.loads((out / "video_samplers.json").read_text())
        if args.notes:
            data["meta"]["notes"] = args.notes
        write_report(out, data["meta"], data["cells"])
        return
    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from vlm_prune import demo
    from vlm_prune.tasks.video import QTYPES, STEPS, make_clips

    model, processor = demo.demo_model("qwen2_vl_video")
    samples = make_clips("test", args.n, seed=args.seed, frames_per_step=args.frames_per_step)
    meta = {
        "n": args.n, "seed": args.seed, "frames_per_step": args.frames_per_step,
        "source_frames": STEPS * args.frames_per_step, "frame_counts": args.frame_counts, "samplers": args.samplers,
        "runs": [list(r) for r in RUNS], "qtypes": list(QTYPES), "load_start": round(os.getloadavg()[0], 2),
        "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, Python {platform.python_version()}", "notes": args.notes,
    }  # fmt: skip
    cells: list[dict] = []
    t0 = time.perf_counter()
    total = len(args.frame_counts) * len(args.samplers) * len(RUNS) * len(samples)
    with tqdm(total=total, desc="video samplers", unit="clip") as bar:
        for k in args.frame_counts:
            for sampler in args.samplers:
                for method, keep in RUNS:
                    cells.append(run_cell(model, processor, samples, sampler, k, method, keep,
                                          args.frames_per_step, bar))  # fmt: skip
                    meta.update(load_end=round(os.getloadavg()[0], 2), minutes=(time.perf_counter() - t0) / 60)
                    write_report(out, meta, cells)


if __name__ == "__main__":
    main()

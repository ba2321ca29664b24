"""LVLM_CSP's two targets on the demo segmenter: gIoU at -65 % image-token FLOPs, and every baseline at equal FLOPs.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/seg_lvlm_csp_target.py --n-samples 200

`vlm-prune bench --task segmentation` runs LVLM_CSP at its depth-scaled defaults (s1 = 1, s2 = 4 on the 8-layer
`llava_seg`: -54 % image-token FLOPs at keep 0.1); the paper's -65 % needs a shallower scatter stage. Here
LVLM_CSP runs at s1 = 1, s2 = 3, N_c = 25 %, keep = 10 % (the schedule `lvlm_csp_flops.md` derives: image-token
work (1 x 0.25 + 2 x 1 + 5 x 0.1) / 8 = 34 %), and each baseline at the budget that gives the SAME image-token
FLOPs reduction (`handle.stats.image_token_flops_reduction`): the pre-LLM methods keep that share of the tokens
in every layer; FastV (pruning at its layer K) keeps k with (K + (depth - K) k) / depth equal to it, K read from a
probe. Scores: the segmentation task's teacher-forced gIoU / cIoU on `make_samples("test", n, seed)` (the bench's
samples), relative to the unpruned segmenter. Writes `benchmarks/results/segmentation_lvlm_csp_target.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PRE_LLM = ("random", "pool", "divprune", "zoo")


def score(vlm, processor, samples, batch: int) -> dict:
    from vlm_prune.models.segmenter import _active_handle
    from vlm_prune.tasks.segmentation import pooled_scores, score_samples

    scored, reductions = [], []
    for i in range(0, len(samples), batch):
        scored += score_samples(vlm, processor, samples[i : i + batch])
        handle = _active_handle(vlm)
        if handle is not None:
            reductions.append(handle.stats.image_token_flops_reduction)
    out = {"giou": sum(s["score"] for s in scored) / len(scored), **pooled_scores(scored)}
    out["image_token_flops_reduction"] = sum(reductions) / len(reductions) if reductions else 0.0
    return out


def main() -> None:
    import vlm_prune
    from vlm_prune.models.segmenter import Segmenter
    from vlm_prune.tasks.segmentation import load_bench_segmenter, make_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava_seg")
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    torch.set_num_threads(args.threads)
    started = time.time()
    vlm, processor, _ = load_bench_segmenter(args.model)
    seg_id = Segmenter.of(vlm).config.seg_token_id
    depth = vlm.config.text_config.num_hidden_layers
    samples = make_samples("test", args.n_samples, seed=args.seed)
    rows = [{"method": "unpruned", "keep": 1.0, **score(vlm, processor, samples, args.batch)}]
    print(rows[-1], flush=True)
    csp = dict(s1=1, s2=3, clusters=0.25, query_token_id=seg_id)
    with vlm_prune.pruned(vlm, "lvlm_csp", keep=0.1, **csp):
        rows.append({"method": "lvlm_csp", "keep": 0.1, "options": {"s1": 1, "s2": 3, "clusters": 0.25},
                     **score(vlm, processor, samples, args.batch)})  # fmt: skip
    print(rows[-1], flush=True)
    target = rows[-1]["image_token_flops_reduction"]
    for method in PRE_LLM:
        with vlm_prune.pruned(vlm, method, keep=1 - target, seed=args.seed):
            rows.append({"method": method, "keep": 1 - target, **score(vlm, processor, samples, args.batch)})
        print(rows[-1], flush=True)
    with vlm_prune.pruned(vlm, "fastv", keep=0.5):  # probe: the share of layers after FastV's layer
        probe = score(vlm, processor, samples[:2], 2)["image_token_flops_reduction"] / 0.5
    keep = max(0.0, 1 - target / probe)
    if keep > 0:
        with vlm_prune.pruned(vlm, "fastv", keep=keep):
            rows.append({"method": "fastv", "keep": keep, **score(vlm, processor, samples, args.batch)})
    else:
        rows.append({"method": "fastv", "keep": None, "skipped": f"cannot remove {target:.1%} after its layer"})
    print(rows[-1], flush=True)
    reference = rows[0]
    for r in rows:
        if "giou" in r:
            r["relative_giou"] = r["giou"] / reference["giou"]
            r["relative_ciou"] = r["ciou"] / reference["ciou"]
    load = os.getloadavg()
    report = {
        "model": args.model, "depth": depth, "n_samples": args.n_samples, "seed": args.seed, "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load[0]:.1f} at the end), {args.threads} thread", "minutes": (time.time() - started) / 60,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "segmentation_lvlm_csp_target.json").write_text(json.dumps(report, indent=1) + "\n")
    csp_row = rows[1]
    best = max((r for r in rows[2:] if "giou" in r), key=lambda r: r["giou"])
    lines = [
        "# LVLM_CSP's targets on the demo segmenter (`benchmarks/seg_lvlm_csp_target.py`)",
        "",
        f"`{args.model}` ({depth} decoder layers, 64 visual tokens), {args.n_samples} held-out test mosaics "
        f"(`make_samples('test', {args.n_samples}, seed={args.seed})`), teacher-forced, {report['machine']}.",
        "LVLM_CSP at s1 = 1, s2 = 3, N_c = 25 %, keep = 10 %; every baseline at the same image-token FLOPs "
        "reduction (pre-LLM: that share of tokens kept in every layer; FastV: its keep after its layer).",
        "",
        "| method | keep | image-token FLOPs removed | gIoU | rel. gIoU | cIoU | rel. cIoU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "giou" not in r:
            lines.append(f"| {r['method']} | - | - | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['keep']:.3f} | {r['image_token_flops_reduction']:.1%} | {r['giou']:.3f} "
                     f"| {r['relative_giou']:.1%} | {r['ciou']:.3f} | {r['relative_ciou']:.1%} |")  # fmt: skip
    lines += [
        "",
        f"- Target 1 (>= 97 % relative gIoU at -65 % image-token FLOPs): LVLM_CSP removes "
        f"{csp_row['image_token_flops_reduction']:.1%} and keeps {csp_row['relative_giou']:.1%}: "
        + ("**met**." if csp_row["relative_giou"] >= 0.97 and csp_row["image_token_flops_reduction"] >= 0.645
           else "**missed**."),
        f"- Target 2 (beats every baseline at equal FLOPs): best baseline {best['method']} at "
        f"{best['relative_giou']:.1%}: " + ("**met**." if csp_row["giou"] > best["giou"] else "**missed**."),
        "",
    ]  # fmt: skip
    (out_dir / "segmentation_lvlm_csp_target.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

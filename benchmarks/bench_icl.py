"""The few-shot bench on the ICL demo model: `vlm-prune bench --task icl` plus the tokens per image kind.

    OMP_NUM_THREADS=1 python benchmarks/bench_icl.py                  # 256 held-out 4-shot episodes (full)
    OMP_NUM_THREADS=1 python benchmarks/bench_icl.py --quick          # the bench's --quick sizes

Runs `vlm_prune.bench.run_bench(task="icl")` on the embedded `llava_icl` model (the task's default model: 5 images of
16 tokens per prompt) for catp, random, pool, divprune, fastv and zoo at R = 66.7 / 77.8 / 88.9 % of the image
tokens removed (keep 0.333 / 0.222 / 0.111), writing `benchmarks/results/bench_icl.{md,json,png}` as the bench
does. Then, for every method and budget, it runs the same episodes once more through `vlm_prune.pruned` (one
forward pass per batch) and records the visual tokens left on the demonstration images and on the query image
after the last stage (`vlm_prune.tasks.icl.token_split`); those go into the JSON (`token_split` of each result), a
table appended to the markdown, and `bench_icl_vs_r.png` (relative accuracy against R and against FLOPs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


@torch.no_grad()
def token_splits(model, processor, samples, method: str, keep: float, batch_size: int = 32) -> dict[str, float]:
    """Mean visual tokens per episode left on the demonstrations and on the query by `method` at `keep`."""
    import vlm_prune
    from vlm_prune.tasks.icl import episode_inputs, token_split

    rows: list[dict[str, int]] = []
    for start in range(0, len(samples), batch_size):
        inputs = episode_inputs(processor, samples[start : start + batch_size])
        with vlm_prune.pruned(model, method, keep=keep) as handle:
            model(**inputs)
            rows += token_split(handle.stats)
    n = max(1, len(rows))
    return {kind: sum(r[kind] for r in rows) / n for kind in ("demonstration", "query")}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in result["results"] if r["method"] != "unpruned"))
    for i, method in enumerate(methods):
        rows = sorted((r for r in result["results"] if r["method"] == method), key=lambda r: -r["keep"])
        removed = [100 * (1 - r["keep"]) for r in rows]
        relative = [100 * (r["relative_accuracy"] or 0) for r in rows]
        style = dict(marker="os^vDx"[i % 6], ls="-" if method == "catp" else "--", lw=2.5 if method == "catp" else 1.2)
        ax[0].plot(removed, relative, label=method, **style)
        ax[1].plot([100 * r["flops_ratio"] for r in rows], relative, label=method, **style)
    ax[0].axhline(98, color="gray", ls=":", lw=0.8)
    ax[0].set_xlabel("R: image tokens removed (%)"), ax[0].set_ylabel("relative accuracy (%)"), ax[0].legend()
    ax[1].set_xlabel("LLM prefill FLOPs (% of unpruned)"), ax[1].set_ylabel("relative accuracy (%)")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"few-shot bench, {result['model']['name'] if isinstance(result.get('model'), dict) else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the bench's --quick sizes")
    parser.add_argument("--n-samples", type=int, default=None, help="episodes per method and budget (full: 256)")
    parser.add_argument("--model", default=None, help="model spec (default: the task's, llava_icl)")
    parser.add_argument("--name", default=None, help="report name (default icl, or icl_quick with --quick)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from vlm_prune import bench
    from vlm_prune.bench_models import load_bench_model
    from vlm_prune.bench_tasks import TASKS

    task = TASKS["icl"]
    spec = args.model or task.default_model
    model, processor, _ = load_bench_model(spec)
    name = args.name or ("icl_quick" if args.quick else "icl")
    n = args.n_samples or (None if args.quick else 256)
    result = bench.run_bench(
        spec, task="icl", quick=args.quick, n_samples=n, out_dir=None, model=model, processor=processor, name=name
    )
    samples = task.samples(result["task"]["n_samples"], result["task"]["seed"])
    for row in result["results"]:
        if row["method"] != "unpruned":
            row["token_split"] = token_splits(model, processor, samples, row["method"], row["keep"])
    from vlm_prune.bench_report import write_outputs

    paths = write_outputs(result, args.out)
    lines = ["", "Visual tokens per episode after the last stage, by image kind (4 demonstrations, 1 query; "
             f"{len(samples)} episodes, `vlm_prune.tasks.icl.token_split`):", "",
             "| method | keep | R % | demonstrations | query | rel. acc % |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in result["results"]:
        split = row.get("token_split")
        if split:
            rel = row.get("relative_accuracy")
            lines.append(f"| {row['method']} | {row['keep']} | {100 * (1 - row['keep']):.1f} | "
                         f"{split['demonstration']:.1f} | {split['query']:.1f} | "
                         f"{'–' if rel is None else f'{100 * rel:.1f}'} |")  # fmt: skip
    md = Path(paths["markdown"])
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    data = {k: v for k, v in result.items() if k not in ("markdown", "files")}
    Path(paths["json"]).write_text(json.dumps(data, indent=1) + "\n")
    plot(result, Path(args.out) / f"bench_{name}_vs_r.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

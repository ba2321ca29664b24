"""The lineage of a demo checkpoint trained as a chain of resumed runs: records and loss plot.

After a resumed run of `benchmarks/train_demo_models.py` (e.g. `--init-from` the shipped model), this appends
the run (one phase per stage it ran: heads / vision / joint) to the lineage kept in the previous record, so that
`demo_<model>_train.json` describes the whole chain that produced the shipped checkpoint, and plots every phase
one after another:

    python benchmarks/demo_lineage.py --previous benchmarks/results/demo_llava_train.json \
        --run run/results/demo_llava_train.json --name "expand 4->12" --out benchmarks/results

A phase: {"phase": name, "stage": "vision" | "heads" | "joint", "steps": int, "seconds": int,
"log_every_50": [loss-history rows of every 50th step and the first], ...} (optionally "note").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

JOINT_KEYS = ("answer", "dense", "attention", "attention_yesno")


def phases_of_run(
    history: list[dict[str, Any]], steps: dict[str, int], name: str, note: str = ""
) -> list[dict[str, Any]]:
    """Phases of one run from its loss history (rows with "stage", "step", "t") and the steps each stage ran
    (`steps`, e.g. {"heads": 300, "joint": 620}); stages that ran no step are left out. Seconds: the last
    logged time of the stage."""
    phases = []
    for stage in ("heads", "vision", "joint"):
        rows = [h for h in history if h["stage"] == stage]
        if not rows or not steps.get(stage):
            continue
        kept = [
            {k: v for k, v in h.items() if k not in ("stage", "lr")}
            for h in rows
            if h["step"] % 50 == 0 or h["step"] == 1
        ]
        phase = {"phase": f"{name} {stage}" if stage != "joint" else name, "stage": stage, "steps": steps[stage],
                 "seconds": int(round(rows[-1]["t"])), "log_every_50": kept}  # fmt: skip
        if note:
            phase["note"] = note
        phases.append(phase)
    return phases


def extend_lineage(previous: dict[str, Any] | None, phases: list[dict[str, Any]]) -> dict[str, Any]:
    """{"lineage": previous phases + `phases`, "lineage_total_seconds": their sum}."""
    lineage = list(previous.get("lineage", [])) if previous else []
    lineage += phases
    return {"lineage": lineage, "lineage_total_seconds": int(sum(ph["seconds"] for ph in lineage))}


def plot_lineage(lineage: list[dict[str, Any]], path: Path, family: str) -> None:
    """Vision-stage phases on the left, every joint phase one after another (cumulative steps) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vision = [ph for ph in lineage if ph["stage"] == "vision"]
    joint = [ph for ph in lineage if ph["stage"] == "joint"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 2.6]})
    offset = 0
    for ph in vision:
        rows = ph["log_every_50"]
        for key in ("dense", "dense_shape", "dense_color", "dense_fg", "dense_cell"):
            if key in rows[0]:
                axes[0].plot([offset + r["step"] for r in rows], [max(r[key], 1e-4) for r in rows], lw=1, label=key)
        offset += ph["steps"]
    axes[0].set_title(f"{family}: vision stage")
    offset = 0
    colors = dict(zip(JOINT_KEYS, ("C0", "C1", "C2", "C3"), strict=True))
    for i, ph in enumerate(joint):
        rows = ph["log_every_50"]
        for key in JOINT_KEYS:
            if key in rows[0]:
                axes[1].plot([offset + r["step"] for r in rows], [max(r[key], 1e-4) for r in rows], lw=1,
                             color=colors[key], label=key if i == len(joint) - 1 else None)  # fmt: skip
        axes[1].axvline(offset, color="grey", lw=0.6, ls="--")
        label = ph["phase"].removeprefix("joint ")
        axes[1].text(offset, 0.98, f" {label}", transform=axes[1].get_xaxis_transform(), fontsize=7, va="top")
        offset += ph["steps"]
    axes[1].set_title(f"{family}: joint phases (cumulative steps)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="append a resumed run to a demo model's lineage and plot it")
    ap.add_argument(
        "--previous", required=True, help="the record (demo_<model>_train.json) of the checkpoint it resumed"
    )
    ap.add_argument("--run", required=True, help="the new run's demo_<model>_train.json")
    ap.add_argument("--name", required=True, help="phase name of the new run, e.g. 'expand 4->12'")
    ap.add_argument("--note", default="", help="what changed in this phase")
    ap.add_argument("--out", required=True, help="results folder: writes demo_<model>_train.json and _loss.png there")
    args = ap.parse_args(argv)
    previous = json.loads(Path(args.previous).read_text())
    run = json.loads(Path(args.run).read_text())
    if previous["model"] != run["model"]:
        raise SystemExit(f"--previous is {previous['model']}, --run is {run['model']}")
    steps = {k: v["steps"] for k, v in run["stages"].items()}
    phases = phases_of_run(run["loss_history"], steps, args.name, args.note)
    if not phases:  # e.g. a depth expansion saved without training: still a step of the lineage
        phases = [{"phase": args.name, "stage": "expand", "steps": 0, "seconds": 0, "log_every_50": [],
                   "note": args.note}]  # fmt: skip
    run.update(extend_lineage(previous, phases))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"demo_{run['model']}_train.json").write_text(json.dumps(run, indent=1))
    plot_lineage(run["lineage"], out / f"demo_{run['model']}_loss.png", run["model"])
    print(f"lineage of {run['model']}: {len(run['lineage'])} phases, {run['lineage_total_seconds'] / 60:.0f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Accuracy against LLM prefill FLOPs from a `vlm-prune bench` JSON: table, equal-FLOPs comparison, plot.

    python benchmarks/bench_flops.py benchmarks/results/bench_llava.json [--against zoo --method adaptinfer]

"64 tokens" costs different compute for a pre-LLM method (every layer sees 64) and an in-LLM one (early
layers see all 576), so methods are compared at equal prefill FLOPs too: for every point of `--method`,
the accuracy of `--against` at the same FLOPs, linearly interpolated between its measured points (the
unpruned model is its 100 % point); outside its measured range it is not extrapolated.

Writes <stem>_flops.md and <stem>_flops.png next to the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def rows_by_method(bench: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Result rows per method, sorted by prefill FLOPs; the unpruned row under "unpruned"."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in bench["results"]:
        out.setdefault(r["method"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["flops_ratio"])
    return out


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x through (x, y) points sorted by x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[-1][0]:
        return points[-1][1]
    return None


def equal_flops(rows: dict[str, list[dict[str, Any]]], method: str, against: str) -> list[dict[str, Any]]:
    """For each row of `method`: its relative accuracy and `against`'s at the same FLOPs ratio."""
    ref = [(r["flops_ratio"], r["relative_accuracy"]) for r in rows.get(against, [])]
    ref += [(r["flops_ratio"], r["relative_accuracy"]) for r in rows.get("unpruned", [])]
    ref.sort()
    return [
        {"keep": r["keep_label"], "flops_ratio": r["flops_ratio"], "relative_accuracy": r["relative_accuracy"],
         "against": interpolate(ref, r["flops_ratio"])}
        for r in rows.get(method, [])
    ]  # fmt: skip


def in_llm(rows: list[dict[str, Any]]) -> bool:
    """A method prunes inside the LLM when some layer sees more visual tokens than it finally keeps."""
    return any(r["equivalent_average_tokens"] > r["visual_tokens_kept"] + 0.5 for r in rows)


def equal_flops_grid(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every in-LLM point against every pre-LLM method at its FLOPs ratio (None outside the measured range)."""
    inside = sorted(m for m, rs in rows.items() if m != "unpruned" and in_llm(rs))
    pre = sorted(m for m, rs in rows.items() if m != "unpruned" and not in_llm(rs))
    out = []
    for method in inside:
        for e in equal_flops(rows, method, pre[0]) if pre else []:
            at = {m: equal_flops(rows, method, m) for m in pre}
            idx = [r["keep_label"] for r in rows[method]].index(e["keep"])
            out.append({"method": method, **e, "against": {m: at[m][idx]["against"] for m in pre}})
    return out


def markdown(bench: dict[str, Any], method: str, against: str) -> str:
    rows = rows_by_method(bench)
    m = bench["model"]
    lines = [
        f"## Accuracy against LLM prefill FLOPs: {m.get('name', '')} ({m.get('num_layers')} decoder layers)",
        "",
        "From `" + str(bench.get("_path", "bench json")) + "` (`benchmarks/bench_flops.py`). FLOPs: LLM prefill, % of"
        " unpruned; eq. avg tokens: visual tokens averaged over decoder layers; relative accuracy = ÷ unpruned.",
        "",
        "| method | keep | eq. avg tokens | FLOPs % | rel. acc % | rel. cell acc % | color % | shape % | yesno % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flat = sorted((r for rs in rows.values() for r in rs), key=lambda r: (r["method"] != "unpruned", r["method"],
                                                                          -r["flops_ratio"]))  # fmt: skip
    for r in flat:
        per = r["per_qtype"]
        lines.append(
            f"| {r['method']} | {r['keep_label']} | {r['equivalent_average_tokens']:.1f} "
            f"| {100 * r['flops_ratio']:.1f} "
            f"| {100 * r['relative_accuracy']:.1f} | {100 * r['relative_cell_accuracy']:.1f} | "
            + " | ".join(f"{100 * per[q]['accuracy']:.1f}" if q in per else "-" for q in ("color", "shape", "yesno"))
            + " |"
        )
    lines += [
        "",
        f"{method} against {against} at equal FLOPs ({against} interpolated between its points and unpruned):",
        "",
        f"| {method} keep | FLOPs % | {method} rel. acc % | {against} rel. acc % at these FLOPs | difference "
        "(points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in equal_flops(rows, method, against):
        ref = "-" if e["against"] is None else f"{100 * e['against']:.1f}"
        diff = "-" if e["against"] is None else f"{100 * (e['relative_accuracy'] - e['against']):+.1f}"
        lines.append(
            f"| {e['keep']} | {100 * e['flops_ratio']:.1f} | {100 * e['relative_accuracy']:.1f} | {ref} | {diff} |"
        )
    grid = equal_flops_grid(rows)
    if grid:
        pre = list(grid[0]["against"])
        lines += [
            "",
            "Every in-LLM point against every pre-LLM method at the same FLOPs (interpolated as above; rel. acc %):",
            "",
            "| in-LLM method | keep | FLOPs % | its rel. acc % | " + " | ".join(pre) + " | best pre-LLM |",
            "|---|---|---:|---:|" + "---:|" * (len(pre) + 1),
        ]
        for g in grid:
            vals = {m: v for m, v in g["against"].items() if v is not None}
            best = max(vals, key=vals.get) if vals else None
            lines.append(
                f"| {g['method']} | {g['keep']} | {100 * g['flops_ratio']:.1f} | {100 * g['relative_accuracy']:.1f} | "
                + " | ".join("-" if g["against"][m] is None else f"{100 * g['against'][m]:.1f}" for m in pre)
                + (f" | {best} {100 * vals[best]:.1f} |" if best else " | - |")
            )
    return "\n".join(lines) + "\n"


def plot(bench: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_by_method(bench)
    base = rows.get("unpruned", [])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, rs in sorted(rows.items()):
        if method == "unpruned":
            continue
        pts = [(100 * r["flops_ratio"], 100 * r["relative_accuracy"]) for r in rs + base]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=method)
    ax.set_xlabel("LLM prefill FLOPs (% of unpruned)")
    ax.set_ylabel("relative accuracy (%)")
    ax.set_title(f"{bench['model'].get('name', '')}: accuracy against prefill FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--method", default="adaptinfer")
    ap.add_argument("--against", default="zoo")
    args = ap.parse_args(argv)
    path = Path(args.bench_json)
    bench = json.loads(path.read_text())
    bench["_path"] = path.name
    stem = path.with_suffix("")
    Path(f"{stem}_flops.md").write_text(markdown(bench, args.method, args.against))
    plot(bench, Path(f"{stem}_flops.png"))
    print(Path(f"{stem}_flops.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

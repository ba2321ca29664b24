"""Reports of `vlm-prune bench`: the markdown table, the plots and the JSON schema check.

`to_markdown(result)` and `plot(result, path)` read the result dict `vlm_prune.bench.run_bench` returns (schema:
`vlm_prune/bench_schema.json`); `validate(data)` checks a bench JSON against that schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent / "bench_schema.json"
UNPRUNED = "unpruned"

def _machine_line(machine: dict) -> str:
    where = machine["gpu"] or f"CPU {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} threads)"
    load = machine.get("load_average")
    if load and not machine["gpu"]:
        where += f", load average {load[0]:.1f} at start"
    versions = f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}"
    return f"{where}; {machine['platform']}; {versions}"


def _keep_label(keep: float | int | None) -> str:
    if keep is None:
        return "own budget"
    if isinstance(keep, float) and keep >= 1.0:
        return "1.0 (unpruned)"
    if isinstance(keep, int):
        return f"{keep} tok"
    return f"{keep:g}"


# ------------------------------------------------------------------------------------------------ outputs
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def to_markdown(result: dict[str, Any]) -> str:
    """The bench as markdown: settings, the main table, the selection overhead, skipped methods."""
    m, t, s = result["model"], result["task"], result["settings"]
    qtypes = list(t["qtypes"])
    media = t.get("media", "image")
    metric = t.get("metric", "accuracy")
    lines = [
        f"## vlm-prune bench: {m['name']} ({m['class']}, {m['parameters'] / 1e6:.2f}M parameters, "
        f"{m['num_layers']} decoder layers, {m['visual_tokens_per_image']} visual tokens per {media})",
        "",
        f"- task: {t['name']} ({t['description']}); {t['n_samples']} test samples (seed {t['seed']}): "
        + ", ".join(f"{q} {n}" for q, n in t["qtypes"].items()),
        f"- machine: {_machine_line(result['machine'])}",
        (
            f"- accuracy: exact match of the greedy answer (batch {s['batch_size']}, left padding); "
            "relative = ÷ unpruned"
            if metric == "accuracy"
            else f"- {metric}: the task's score per sample, averaged (batch {s['batch_size']}); relative = ÷ unpruned"
        ),
        f"- latency: batch 1 on one fixed sample, median of {s['repeats']} runs after {s['warmup']} warm-up; "
        "prefill = time to first token (vision encoder + LLM prefill, scoring included); "
        "speedup = unpruned prefill ÷ pruned prefill",
        f"- tokens: visual tokens kept per {media} (mean); eq. avg = equivalent average visual tokens over decoder "
        "layers (in-LLM schedules); FLOPs: LLM prefill (formula in vlm_prune/engine/stats.py); KV: cache after prefill",
        "",
    ]
    head = ["method", "keep", "tokens kept", "eq. avg tokens", f"{metric} %", f"rel. {metric} %"]
    head += [f"{q} %" for q in qtypes]
    head += ["prefill GFLOPs", "FLOPs %", "KV MiB", "prefill ms", "speedup", "select ms", "decode ms/tok"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in result["results"]:
        lat = r["latency"]
        keep = r["keep_label"] + (" *" if r.get("note") else "")
        cells = [
            r["method"], keep, _num(r["visual_tokens_kept"]), _num(r["equivalent_average_tokens"]),
            _pct(r["accuracy"]), _pct(r["relative_accuracy"]),
        ]  # fmt: skip
        cells += [_pct(r["per_qtype"].get(q, {}).get("accuracy")) for q in qtypes]
        cells += [
            _num(r["prefill_flops"] / 1e9, "{:.3f}"), _pct(r["flops_ratio"]),
            _num(r["kv_cache_bytes"] / 2**20 if r["kv_cache_bytes"] is not None else None, "{:.2f}"),
            _num(lat["prefill_ms"], "{:.2f}"), _num(r["speedup"], "{:.2f}x"),
            _num(lat["select_ms"], "{:.2f}"), _num(lat["decode_ms_per_token"], "{:.2f}"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ref = result.get("reference")
    if ref:
        lat = ref["latency"]
        lines.append(
            f"Unpruned timing split: vision encoder {_num(lat['vision_ms'], '{:.2f}')} ms + LLM prefill "
            f"{_num(lat['llm_prefill_ms'], '{:.2f}')} ms = {_num(lat['prefill_ms'], '{:.2f}')} ms to first token; "
            f"decode {_num(lat['decode_ms_per_token'], '{:.2f}')} ms per token."
        )
        lines.append("")
    pruned = [r for r in result["results"] if r["method"] != UNPRUNED]
    if pruned:
        lines.append("Selection overhead (scoring time inside the prefill above, median, ms), and the LLM-only part:")
        lines.append("")
        lines.append("| method | keep | select ms | select % of prefill | LLM prefill ms | LLM speedup |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for r in pruned:
            lat = r["latency"]
            share = lat["select_ms"] / lat["prefill_ms"] if lat["prefill_ms"] else None
            lines.append(
                f"| {r['method']} | {r['keep_label']} | {_num(lat['select_ms'], '{:.2f}')} | {_pct(share)} | "
                f"{_num(lat['llm_prefill_ms'], '{:.2f}')} | {_num(r['llm_prefill_speedup'], '{:.2f}x')} |"
            )
        lines.append("")
    notes = [r for r in result["results"] if r.get("note")]
    for r in notes:
        lines.append(f"\\* {r['method']} @ {r['keep_label']}: {r['note']}")
    if notes:
        lines.append("")
    if result["skipped"]:
        lines.append("Skipped:")
        lines.append("")
        for sk in result["skipped"]:
            lines.append(f"- {sk['method']} @ {_keep_label(sk['keep'])} ({sk['status']}): {sk['reason']}")
        lines.append("")
    lines.append(f"Total bench time {result['elapsed_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG with accuracy against visual tokens and speedup against visual tokens, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in result["results"] if r["method"] != UNPRUNED]
    ref = result.get("reference")
    fig = Figure(figsize=(17, 4.8))
    FigureCanvasAgg(fig)
    ax_acc, ax_flops, ax_speed = fig.subplots(1, 3)
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["equivalent_average_tokens"] or 0)
        x = [r["equivalent_average_tokens"] for r in rs]
        ax_acc.plot(x, [100 * (r["accuracy"] or 0) for r in rs], marker="o", label=method)
        by_flops = sorted(rs, key=lambda r: r["flops_ratio"] or 0)
        ax_flops.plot(
            [100 * (r["flops_ratio"] or 0) for r in by_flops],
            [100 * (r["accuracy"] or 0) for r in by_flops],
            marker="o",
            label=method,
        )
        ax_speed.plot(x, [r["speedup"] or 0 for r in rs], marker="o", label=method)
    if ref:
        ax_acc.axhline(100 * (ref["accuracy"] or 0), color="k", ls="--", lw=1, label="unpruned")
        ax_acc.plot([ref["visual_tokens_kept"]], [100 * (ref["accuracy"] or 0)], "k*", ms=10)
        ax_flops.axhline(100 * (ref["accuracy"] or 0), color="k", ls="--", lw=1, label="unpruned")
        ax_speed.axhline(1.0, color="k", ls="--", lw=1, label="unpruned")
        ax_speed.plot([ref["visual_tokens_kept"]], [1.0], "k*", ms=10)
    m = result["model"]
    for ax, ylabel in ((ax_acc, "accuracy (%)"), (ax_speed, "prefill speedup (x, batch 1)")):
        ax.set_xlabel("visual tokens (equivalent average over decoder layers)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.set_title(
        f"{m['name']}: accuracy vs tokens ({result['task']['n_samples']} {result['task']['name']} samples)"
    )
    ax_speed.set_title(f"{m['name']}: speedup vs tokens ({result['machine']['gpu'] or 'CPU'})")
    ax_flops.set_xlabel("LLM prefill FLOPs (% of unpruned)")
    ax_flops.set_ylabel("accuracy (%)")
    ax_flops.grid(alpha=0.3)
    ax_flops.set_title(f"{m['name']}: accuracy vs prefill FLOPs")
    ax_flops.set_ylim(0, 105)
    ax_acc.set_ylim(0, 105)
    ax_speed.set_ylim(bottom=0)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write bench_<name>.md/.json/.png into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{result['model']['name']}"
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["markdown"].write_text(result["markdown"])
    data = {k: v for k, v in result.items() if k not in ("markdown", "files")}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    plot(result, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------ schema
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(data: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Validate a bench JSON against `bench_schema.json` (jsonschema when installed, else a small validator
    of the subset the schema uses). Raises ValueError listing the first problem."""
    schema = schema or load_schema()
    try:
        import jsonschema
    except ImportError:
        _validate(data, schema, schema, "$")
        return
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        raise ValueError(f"bench JSON does not follow the schema at {list(e.absolute_path)}: {e.message}") from e


_TYPES = {
    "object": dict, "array": (list, tuple), "string": str, "boolean": bool, "null": type(None),
}  # fmt: skip


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _validate(value, schema: dict, root: dict, where: str) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        node = root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        schema = node
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _validate(value, option, root, where)
                break
            except ValueError as e:
                errors.append(str(e))
        else:
            raise ValueError(f"{where}: matches none of the allowed forms ({'; '.join(errors)})")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_type_ok(value, t) for t in types):
            raise ValueError(f"{where}: expected {' or '.join(types)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        raise ValueError(f"{where}: expected {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                _validate(v, props[key], root, f"{where}.{key}")
            elif extra is False:
                raise ValueError(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                _validate(v, extra, root, f"{where}.{key}")
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise ValueError(f"{where}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, v in enumerate(value):
                _validate(v, schema["items"], root, f"{where}[{i}]")

"""`vlm-prune` CLI and `vlm_prune.bench`: help texts, error messages, the bench JSON schema.

The bench run uses the embedded LLaVA with a handful of samples and one repeat (a few seconds on CPU);
set VLM_PRUNE_TEST_MODEL to a model folder to run it on another checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlm_prune
from vlm_prune import bench, cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("demo", "bench", "methods", "models", "calibrate")


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse --help / --version
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ help
def test_top_level_help_exits_zero_and_teaches(capsys):
    code, out, _ = _run_cli(capsys, "--help")
    assert code == 0
    for command in SUBCOMMANDS:
        assert command in out
    assert "examples:" in out and "vlm-prune demo" in out


def test_no_command_prints_help(capsys):
    code, out, _ = _run_cli(capsys)
    assert code == 0 and "usage: vlm-prune" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_zero_with_example_and_defaults(capsys, command):
    code, out, _ = _run_cli(capsys, command, "--help")
    assert code == 0
    assert f"usage: vlm-prune {command}" in out
    assert "example" in out  # every command shows an example
    if command in ("demo", "bench", "calibrate"):
        assert "default: llava" in " ".join(out.split())  # defaults are shown


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_prune", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: vlm-prune" in proc.stdout


def test_bench_help_documents_every_run_bench_option(capsys):
    _, out, _ = _run_cli(capsys, "bench", "--help")
    for flag in ("--model", "--task", "--methods", "--keeps", "--n-samples", "--repeats", "--quick", "--out-dir",
                 "--seed", "--no-progress", "--warmup", "--batch-size", "--device", "--threads"):  # fmt: skip
        assert flag in out


# ------------------------------------------------------------------------------------------------ methods / models
def test_methods_lists_registered_names(capsys):
    code, out, _ = _run_cli(capsys, "methods")
    assert code == 0
    for name, summary in vlm_prune.methods().items():
        assert name in out
        assert summary[:30] in out


def test_methods_json(capsys):
    code, out, _ = _run_cli(capsys, "methods", "--json")
    assert code == 0 and json.loads(out) == vlm_prune.methods()


def test_models_lists_supported_families(capsys):
    code, out, _ = _run_cli(capsys, "models")
    assert code == 0
    for cls in vlm_prune.supported_models():
        assert cls in out
    assert "llava" in out and "qwen2_vl" in out


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("spec", ["./no/such/model_folder", "/definitely/not/here", "a/b/c"])
def test_missing_model_path_gives_clear_error(spec):
    with pytest.raises(vlm_prune.PruneError) as info:
        bench.load_bench_model(spec)
    message = str(info.value)
    assert isinstance(info.value, bench.ModelSpecError)
    assert "does not exist" in message
    assert "'llava'" in message and "save_pretrained" in message and "hub id" in message


def test_invalid_model_folder_gives_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(bench.ModelSpecError) as info:
        bench.load_bench_model(str(tmp_path))
    message = str(info.value)
    assert "config.json" in message and "save_pretrained" in message


def test_model_path_that_is_a_file_gives_clear_error(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0")
    with pytest.raises(bench.ModelSpecError, match="not a model folder"):
        bench.load_bench_model(str(f))


def test_cli_reports_bad_model_with_exit_code_2(capsys):
    code, out, err = _run_cli(capsys, "bench", "--model", "./no/such/model_folder", "--no-progress")
    assert code == 2
    assert "error" in err and "does not exist" in err and "'llava'" in err


def test_unknown_task_and_bad_budget():
    with pytest.raises(bench.BenchError, match="available tasks: mosaic"):
        bench.run_bench("llava", task="vqav2", progress=False)
    with pytest.raises(bench.BenchError, match="fraction"):
        bench.run_bench("llava", keeps=(1.0, 1.5), progress=False)


def test_unknown_method_lists_known_ones():
    with pytest.raises(vlm_prune.UnknownMethodError, match="fastv"):
        bench.run_bench("llava", methods=["no-such-method"], progress=False)


# ------------------------------------------------------------------------------------------------ schema
def test_schema_is_valid_json_schema_document():
    schema = bench.load_schema()
    assert schema["title"] and "definitions" in schema and "row" in schema["definitions"]
    try:
        import jsonschema
    except ImportError:
        pytest.skip("jsonschema not installed: the hand-written validator is used")
    jsonschema.Draft7Validator.check_schema(schema)


def _example_result() -> dict:
    """A small hand-written result in the documented shape (no model needed)."""
    lat = {"prefill_ms": 10.0, "prefill_ms_runs": [10.0], "vision_ms": 4.0, "llm_prefill_ms": 6.0, "select_ms": 0.0,
           "decode_ms_per_token": 1.0}  # fmt: skip
    qt = {"color": {"accuracy": 1.0, "n": 1, "correct": 1, "relative_accuracy": 1.0}}
    ref = {
        "method": "unpruned", "keep": 1.0, "keep_label": "1.0 (unpruned)", "keep_passed": None, "note": None,
        "accuracy": 1.0, "relative_accuracy": 1.0, "cell_accuracy": 1.0, "relative_cell_accuracy": 1.0, "n": 1,
        "correct": 1, "per_qtype": qt, "visual_tokens_in": 576.0, "visual_tokens_kept": 576.0, "keep_ratio": 1.0,
        "equivalent_average_tokens": 576.0, "prefill_flops": 100, "prefill_flops_unpruned": 100, "flops_ratio": 1.0,
        "kv_cache_bytes": 10, "kv_cache_bytes_unpruned": 10, "stages": [], "latency": lat, "speedup": 1.0,
        "llm_prefill_speedup": 1.0,
    }  # fmt: skip
    row = dict(copy.deepcopy(ref), method="fastv", keep=64, keep_label="64 tok", keep_passed=64, speedup=1.5)
    row["stages"] = [{"name": "fastv", "layer": 2, "tokens_in": 576, "tokens_out": 64}]
    return {
        "schema_version": 1, "tool": "vlm_prune.bench", "vlm_prune_version": "0.1.0", "created": "now",
        "model": {"spec": "llava", "source": "embedded", "name": "llava", "class": "LlavaForConditionalGeneration",
                  "family": "llava", "name_or_path": "", "num_layers": 4, "parameters": 1, "dtype": "float32",
                  "attn_implementation": "sdpa", "visual_tokens_per_image": 576},
        "task": {"name": "mosaic", "description": "", "split": "test", "n_samples": 1, "seed": 0,
                 "qtypes": {"color": 1}},
        "settings": {"methods": ["fastv"], "keeps": [1.0, 64], "quick": True, "repeats": 1, "warmup": 0,
                     "batch_size": 1, "max_new_tokens": 4, "decode_tokens": 1, "latency_batch": 1,
                     "latency_sample": 0, "device": "cpu"},
        "machine": bench.describe_machine("cpu"),
        "reference": ref, "results": [ref, row],
        "skipped": [{"method": "adaptinfer", "keep": 64, "status": "skipped", "reason": "BudgetError: ..."}],
        "elapsed_seconds": 1.0,
    }  # fmt: skip


def test_example_result_validates_and_renders():
    data = _example_result()
    bench.validate(data)
    md = bench.to_markdown(data)
    assert "| fastv | 64 tok |" in md and "Skipped:" in md and "Selection overhead" in md


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("results"),
        lambda d: d["results"][1].pop("accuracy"),
        lambda d: d["results"][1].__setitem__("accuracy", 1.5),
        lambda d: d["results"][1].__setitem__("keep", "64"),
        lambda d: d["results"][1]["latency"].pop("prefill_ms"),
        lambda d: d["skipped"][0].__setitem__("status", "maybe"),
        lambda d: d.__setitem__("schema_version", 2),
    ],
)
def test_validator_rejects_broken_documents(breakage):
    data = _example_result()
    breakage(data)
    with pytest.raises(ValueError):
        bench.validate(data)


def test_hand_written_validator_agrees_on_example():
    # the fallback used when jsonschema is missing
    schema = bench.load_schema()
    bench._validate(_example_result(), schema, schema, "$")
    broken = _example_result()
    broken["results"][0]["per_qtype"]["color"]["n"] = -1
    with pytest.raises(ValueError, match="minimum"):
        bench._validate(broken, schema, schema, "$")


# ------------------------------------------------------------------------------------------------ a real run
def _bench_model() -> str:
    spec = os.environ.get("VLM_PRUNE_TEST_MODEL")
    if spec:
        return spec
    from vlm_prune.demo import demo_model_path

    if not (demo_model_path("llava") / "config.json").is_file():
        pytest.skip("the embedded LLaVA checkpoint is not built (benchmarks/train_demo_models.py)")
    return "llava"


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    spec = _bench_model()
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench")
    try:
        result = bench.run_bench(
            spec, methods=["random", "fastv", "adaptinfer"], keeps=(1.0, 64), n_samples=4, repeats=1, quick=True,
            out_dir=out, progress=False, warmup=0, batch_size=4, decode_tokens=1, threads=1, name="tiny",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return result, out


def test_bench_json_follows_schema(tiny_bench):
    result, out = tiny_bench
    files = result["files"]
    assert set(files) == {"markdown", "json", "png"}
    data = json.loads(Path(files["json"]).read_text())
    bench.validate(data)
    assert Path(files["png"]).stat().st_size > 1000
    assert Path(files["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| random | 64 tok |" in Path(files["markdown"]).read_text()


def test_bench_rows_are_consistent(tiny_bench):
    result, _ = tiny_bench
    ref = result["reference"]
    assert ref["method"] == "unpruned" and ref["speedup"] == pytest.approx(1.0)
    n_visual = result["model"]["visual_tokens_per_image"]
    assert ref["visual_tokens_kept"] == n_visual
    rows = {(r["method"], r["keep"]): r for r in result["results"]}
    rnd = rows[("random", 64)]
    assert rnd["visual_tokens_kept"] == 64 and rnd["equivalent_average_tokens"] == pytest.approx(64)
    assert rnd["prefill_flops"] < ref["prefill_flops"] and rnd["kv_cache_bytes"] < ref["kv_cache_bytes"]
    assert rnd["prefill_flops_unpruned"] == ref["prefill_flops"]
    assert rnd["kv_cache_bytes_unpruned"] == ref["kv_cache_bytes"]
    fastv = rows[("fastv", 64)]
    assert fastv["equivalent_average_tokens"] > fastv["visual_tokens_kept"]  # in-LLM: early layers see all
    assert fastv["stages"] and fastv["stages"][0]["layer"] >= 1
    for r in result["results"]:
        assert set(r["per_qtype"]) == set(result["task"]["qtypes"])
        assert r["latency"]["prefill_ms"] > 0 and r["speedup"] > 0
    # AdaptInfer at 64 of 576 tokens: a decoder too shallow to average that low records it as skipped, with the
    # reason; the embedded models ship a calibrated preset for 64 tokens, which runs as asked
    skipped = {(s["method"], s["keep"]): s for s in result["skipped"]}
    if ("adaptinfer", 64) in skipped:
        assert skipped[("adaptinfer", 64)]["status"] == "skipped"
        assert "adaptinfer" in result["markdown"].split("Skipped:")[1]
    else:
        adaptinfer = rows[("adaptinfer", 64)]
        assert adaptinfer["keep_passed"] != 64 or adaptinfer["equivalent_average_tokens"] == pytest.approx(64, abs=1)


def test_video_bench_task(tmp_path):
    """`bench --task video` on the embedded video model: EVS keeps exactly its count, PruneVid also runs at its
    own budget, answers are scored per temporal question type, and the JSON follows the schema."""
    from vlm_prune.methods.evs import retained_count

    threads = torch.get_num_threads()
    try:
        result = bench.run_bench(
            task="video", methods=["evs", "prunevid"], keeps=[1.0, 0.5], n_samples=5, repeats=1, warmup=0,
            decode_tokens=1, progress=False, out_dir=tmp_path, threads=1,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert result["model"]["name"] == "qwen2_vl_video" and result["task"]["media"] == "video"
    rows = {(r["method"], r["keep"]): r for r in result["results"]}
    assert set(rows) == {("unpruned", 1.0), ("evs", 0.5), ("prunevid", 0.5), ("prunevid", None)}
    n_video = result["model"]["visual_tokens_per_image"]
    from vlm_prune.tasks.video import eval_samples, video_inputs

    _, processor, _ = bench.load_bench_model("qwen2_vl_video")
    grid = video_inputs(processor, eval_samples(1, seed=0))["video_grid_thw"][0]
    assert rows[("evs", 0.5)]["visual_tokens_kept"] == retained_count(grid, 0.5, spatial_merge_size=2) < n_video
    assert rows[("prunevid", None)]["keep_label"] == "own budget"
    assert set(rows[("evs", 0.5)]["per_qtype"]) == {"appeared_last", "moved", "recolored", "start", "end"}
    bench.validate(json.loads(Path(result["files"]["json"]).read_text()))

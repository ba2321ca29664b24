"""The lmms-eval plugin, end to end offline through `lmms_eval.evaluator.simple_evaluate` (the CLI exits 0 even
when evaluation fails): registration by entry point, model_args as lmms-eval casts them, the local video task,
pruned and unpruned, with per-doc answers and scores equal to the bench's evaluation of the same samples (the
video task's generate on the embedded video model, `vlm_prune.demo.evaluate` on the embedded LLaVA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("easy_vqa")

import vlm_prune  # noqa: E402
from vlm_prune.demo import normalize_answer  # noqa: E402
from vlm_prune.integrations import lmms_eval as plugin  # noqa: E402
from vlm_prune.tasks import video as V  # noqa: E402

torch.set_num_threads(1)
TASKS = Path(plugin.__file__).parent / "lmms_tasks"
LIMIT = 5


def _evaluate(model_args: str, task: str = "vlm_prune_video") -> tuple[dict, list[str]]:
    """(the task's results, the answers per doc in doc order)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = simple_evaluate(model="vlm_prune", model_args=model_args, tasks=[task], task_manager=tm,
                          limit=LIMIT, batch_size="1", log_samples=True)  # fmt: skip
    samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
    answers = [x["filtered_resps"][0] for x in samples]
    return out["results"][task], [a if isinstance(a, str) else a[0] for a in answers]


def test_entry_point_registers_a_simple_model():
    from lmms_eval import models

    cls = models.get_model("vlm_prune")
    assert cls is plugin.VlmPrune and cls.is_simple


@pytest.mark.parametrize("method", ["none", "evs"])
def test_video_task_scores_equal_the_bench_evaluation(method):
    """On the embedded video model, against the video task's own generate (bench's path), one sample per batch."""
    got, got_answers = _evaluate(f"base=qwen2_vl,pretrained=demo:qwen2_vl_video,method={method},keep=0.5,num_frames=8")
    model, proc = vlm_prune.demo_model("qwen2_vl_video")
    samples = V.make_clips("test", 20, seed=0)[:LIMIT]
    if method == "none":
        answers = V.generate_answers(model, proc, samples, batch_size=1)
    else:
        with vlm_prune.pruned(model, method, keep=0.5):
            answers = V.generate_answers(model, proc, samples, batch_size=1)
    assert got_answers == answers
    assert got["exact_match,none"] == pytest.approx(V.score(answers, samples)["accuracy"])


@pytest.mark.parametrize("method", ["none", "divprune"])
def test_mosaic_task_scores_equal_the_bench_evaluation(method):
    from vlm_prune.data.mosaic import make_mosaics
    from vlm_prune.demo import evaluate

    got, got_answers = _evaluate(f"base=llava,pretrained=demo:llava,method={method},keep=0.25", "vlm_prune_mosaic")
    model, proc = vlm_prune.demo_model("llava")
    samples = make_mosaics("test", 40, seed=0)[:LIMIT]
    if method == "none":
        want = evaluate(model, proc, samples, batch_size=1, progress=False)
    else:
        with vlm_prune.pruned(model, method, keep=0.25):
            want = evaluate(model, proc, samples, batch_size=1, progress=False)
    assert [normalize_answer(a) for a in got_answers] == want["predictions"]
    assert got["exact_match,none"] == pytest.approx(want["accuracy"])


def test_model_args_are_checked_and_clean_drops_the_model():
    with pytest.raises(plugin.LmmsEvalError, match="is a 'qwen2_vl' model"):
        plugin.VlmPrune(pretrained="demo:qwen2_vl", base="llava")
    with pytest.raises(plugin.LmmsEvalError, match="unknown model_args"):
        plugin.VlmPrune(pretrained="demo:qwen2_vl", rate=0.5)
    lm = plugin.VlmPrune(pretrained="demo:qwen2_vl", batch_size="1", keep=0.5)
    assert isinstance(lm._model, torch.nn.Module)
    lm.clean()
    assert not hasattr(lm, "_model")

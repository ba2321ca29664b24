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


def _evaluate(model_args: str, task: str = "vlm_prune_video", face: str = "chat") -> tuple[dict, list[str]]:
    """(the task's results, the answers per doc in doc order), through the chat (default) or the simple class."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = simple_evaluate(model="vlm_prune", model_args=model_args, tasks=[task], task_manager=tm,
                          limit=LIMIT, batch_size="1", log_samples=True, force_simple=face == "simple")  # fmt: skip
    samples = sorted(out["samples"][task], key=lambda x: x["doc_id"])
    answers = [x["filtered_resps"][0] for x in samples]
    return out["results"][task], [a if isinstance(a, str) else a[0] for a in answers]


def test_entry_point_registers_a_chat_and_a_simple_model():
    from lmms_eval import models

    assert models.get_model("vlm_prune") is plugin.VlmPruneChat and not plugin.VlmPruneChat.is_simple
    simple = models.get_model("vlm_prune", force_simple=True)
    assert simple is plugin.VlmPrune and simple.is_simple


def test_chat_user_turn_gives_media_and_text_and_refuses_other_chats():
    from lmms_eval.protocol import ChatMessages

    frames = object()
    raw = [{"role": "user", "content": [{"type": "video", "url": frames}, {"type": "text", "text": "a"},
                                        {"type": "text", "text": "b"}]}]  # fmt: skip
    assert plugin._user_turn(raw) == ([frames], "a\nb")
    visuals, text = plugin._user_turn(ChatMessages(messages=raw))
    assert visuals[0] is frames and text == "a\nb"
    with pytest.raises(plugin.LmmsEvalError, match="one user turn"):
        plugin._user_turn(raw + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(plugin.LmmsEvalError, match="not 'audio'"):
        plugin._user_turn([{"role": "user", "content": [{"type": "audio", "url": "x.wav"}]}])


@pytest.mark.parametrize(("method", "face"), [("none", "chat"), ("evs", "chat"), ("evs", "simple")])
def test_video_task_scores_equal_the_bench_evaluation(method, face):
    """On the embedded video model, against the video task's own generate (bench's path), one sample per batch."""
    args = f"base=qwen2_vl,pretrained=demo:qwen2_vl_video,method={method},keep=0.5,num_frames=8"
    got, got_answers = _evaluate(args, face=face)
    model, proc = vlm_prune.demo_model("qwen2_vl_video")
    samples = V.make_clips("test", 20, seed=0)[:LIMIT]
    if method == "none":
        answers = V.generate_answers(model, proc, samples, batch_size=1)
    else:
        with vlm_prune.pruned(model, method, keep=0.5):
            answers = V.generate_answers(model, proc, samples, batch_size=1)
    assert got_answers == answers
    assert got["exact_match,none"] == pytest.approx(V.score(answers, samples)["accuracy"])


@pytest.mark.parametrize(("method", "face"), [("none", "simple"), ("divprune", "simple"), ("divprune", "chat")])
def test_mosaic_task_scores_equal_the_bench_evaluation(method, face):
    from vlm_prune.data.mosaic import make_mosaics
    from vlm_prune.demo import evaluate

    args = f"base=llava,pretrained=demo:llava,method={method},keep=0.25"
    got, got_answers = _evaluate(args, "vlm_prune_mosaic", face)
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

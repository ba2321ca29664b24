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
from tests.reference import TINY_SAM_CONFIG as SAM  # noqa: E402
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


@pytest.mark.parametrize(("method", "face"), [("none", "simple"), ("catp", "chat")])
def test_icl_task_scores_equal_the_bench_evaluation(method, face):
    """Interleaved 4-shot episodes on the embedded few-shot model llava_icl (the bench's ICL default), against
    `tasks.icl.generate_answers` one episode at a time."""
    from vlm_prune.tasks import icl as I

    keep = 0.333
    got, got_answers = _evaluate(f"base=llava,pretrained=demo:llava_icl,method={method},keep={keep}",
                                 "vlm_prune_icl", face)  # fmt: skip
    model, proc = vlm_prune.demo_model("llava_icl")
    episodes = I.make_episodes("test", 20, seed=0, shots=4, words=I.DEMO_WORDS)[:LIMIT]

    def answer(e):
        return I.generate_answers(model, proc, [e], max_new_tokens=4)[0]

    if method == "none":
        want = [answer(e) for e in episodes]
    else:
        with vlm_prune.pruned(model, method, keep=keep):
            want = [answer(e) for e in episodes]
    assert got_answers == want
    correct = [normalize_answer(a) == normalize_answer(e.answer) for a, e in zip(want, episodes)]
    assert got["exact_match,none"] == pytest.approx(sum(correct) / LIMIT)
    if method == "none":
        assert sum(correct) >= LIMIT - 1  # the few-shot model learns the binding from the demonstrations


def test_masks_round_trip_as_run_length_text():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert plugin.mask_to_text(mask) == "2 3 1 3 2"  # runs: 1 False, 3 True, 2 False
    assert plugin.mask_to_text(torch.ones(1, 2, dtype=torch.bool)) == "1 2 0 2"
    for m in (mask, torch.ones(1, 2, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)):
        assert torch.equal(plugin.text_to_mask(plugin.mask_to_text(m)), m)
    assert plugin.text_to_mask("no mask here").shape == (0, 0) and plugin.text_to_mask("2 2 1").shape == (0, 0)




@pytest.fixture(scope="module")
def saved_segmenter(tmp_path_factory):
    """A Segmenter on the embedded LLaVA with a tiny random SAM (no trained demo segmenter ships), saved."""
    from transformers import SamConfig, SamModel

    from vlm_prune.models.segmenter import Segmenter, SegmenterConfig, add_seg_token

    vlm, processor = vlm_prune.demo_model("llava")
    seg_id = add_seg_token(vlm, processor)
    torch.manual_seed(0)
    segmenter = Segmenter(vlm, SamModel(SamConfig(**SAM)).eval(), SegmenterConfig(seg_token_id=seg_id))
    torch.manual_seed(1)
    for parameter in segmenter.text_hidden_fcs.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    path = tmp_path_factory.mktemp("seg") / "seg"
    segmenter.save_pretrained(path, processor=processor)
    return path


@pytest.mark.parametrize(("method", "face"), [("none", "simple"), ("random", "chat")])
def test_segmentation_task_scores_equal_the_bench_evaluation(saved_segmenter, method, face):
    """gIoU / cIoU through lmms-eval equal `tasks.segmentation.score_samples` (the bench's scoring), per sample."""
    from vlm_prune.tasks import segmentation as G

    keep = 0.25
    got, _ = _evaluate(f"pretrained={saved_segmenter},method={method},keep={keep}", "vlm_prune_segmentation", face)
    model, proc, _ = G.load_bench_segmenter(str(saved_segmenter))
    samples = G.make_samples("test", 20, seed=0)[:LIMIT]
    if method == "none":
        scored = [G.score_samples(model, proc, [s])[0] for s in samples]
    else:
        with vlm_prune.pruned(model, method, keep=keep):
            scored = [G.score_samples(model, proc, [s])[0] for s in samples]
    assert got["giou,none"] == pytest.approx(sum(s["score"] for s in scored) / LIMIT)
    assert got["ciou,none"] == pytest.approx(G.pooled_scores(scored)["ciou"])
    assert 0 < sum(s["intersection"] for s in scored)  # masks that overlap: the comparison is not 0 == 0

"""The ICL task (`vlm_prune.tasks.icl`): nonce-word episodes, their interleaved inputs, and `bench --task icl` on a
random-weight model with the demo LLaVA's processor (8 decoder layers, so that CATP's K and K+1 are interior)."""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.tasks.icl import DEMO_WORDS, NONCE_WORDS, episode_inputs, make_episodes, token_split

pytest.importorskip("easy_vqa")


def test_episodes_bind_words_at_random_and_keep_the_answer_in_the_context():
    episodes = make_episodes("test", 24, seed=1, shots=4, ways=2)
    bindings = set()
    for episode in episodes:
        binding = dict(episode.binding)
        assert len(binding) == 2 and len(set(binding.values())) == 2
        assert set(binding.values()) <= set(NONCE_WORDS)
        for cell, word in episode.demonstrations:
            assert binding[cell.color] == word
        assert sorted(cell.color for cell, _ in episode.demonstrations) == sorted(list(binding) * 2)  # 2 each
        assert episode.answer == binding[episode.query.color]
        images = [cell.image_id for cell, _ in episode.demonstrations] + [episode.query.image_id]
        assert len(set(images)) == 5  # the query is a new image
        bindings.add(episode.binding)
    assert len(bindings) > 12  # a fresh binding per episode
    assert make_episodes("test", 24, seed=1)[:5] == make_episodes("test", 5, seed=1)
    assert make_episodes("test", 5, seed=2) != make_episodes("test", 5, seed=1)


def test_splits_stay_apart_and_zero_shots_hold_no_context():
    train = {c.image_id for e in make_episodes("train", 16) for c in [e.query, *(d for d, _ in e.demonstrations)]}
    assert all(e.split == "train" for e in make_episodes("train", 2))
    test_cells = [c for e in make_episodes("test", 16) for c in [e.query, *(d for d, _ in e.demonstrations)]]
    assert all(c.split == "test" for c in test_cells) and train
    zero = make_episodes("test", 4, shots=0)
    assert all(e.shots == 0 and e.answer in dict(e.binding).values() for e in zero)
    shapes = make_episodes("test", 4, attribute="shape", ways=3, shots=6)
    assert all(dict(e.binding)[e.query.shape] == e.answer for e in shapes)


def _processor():
    from vlm_prune.demo import demo_model_path, load_processor

    return load_processor(demo_model_path("llava"))


def _random_icl_model(layers: int = 8):
    """The demo LLaVA's architecture with random weights and `layers` decoder layers."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vlm_prune.demo import demo_model_path

    config = AutoConfig.from_pretrained(demo_model_path("llava"))
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_episode_inputs_give_each_demonstration_its_word_as_paired_text():
    processor = _processor()
    episodes = make_episodes("test", 2, shots=4, words=DEMO_WORDS)[:1] + make_episodes(
        "test", 1, shots=2, words=DEMO_WORDS
    )
    inputs = episode_inputs(processor, episodes)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == (5 + 3) * 576
    assert inputs["attention_mask"][1, 0] == 0  # the 2-shot row is left-padded
    model = _random_icl_model(layers=4)

    class Words(vlm_prune.Method):
        layer = 0

        def __init__(self):
            self.words = []

        def select(self, ctx):
            segments = ctx.segments
            texts = [
                processor.tokenizer.decode(ctx.input_ids[segments.text_index(i)]) for i in range(segments.num_media)
            ]
            self.words.append(texts)
            return torch.ones(ctx.num_visual, dtype=torch.bool)

    recorder = Words()
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    for texts, episode in zip(recorder.words, episodes):
        assert [t.split()[0] for t in texts[:-1]] == [word for _, word in episode.demonstrations]
        assert texts[-1].startswith(episode.question)


def test_bench_task_icl_runs_catp_and_a_baseline_on_a_random_model(tmp_path):
    from vlm_prune import bench

    assert "icl" in bench.TASKS
    model, processor = _random_icl_model(), _processor()
    threads = torch.get_num_threads()
    try:
        result = bench.run_bench(
            "random-icl", task="icl", model=model, processor=processor, methods=["catp", "divprune"],
            keeps=(1.0, 0.222), n_samples=2, repeats=1, warmup=0, batch_size=2, decode_tokens=1, threads=1,
            progress=False, out_dir=tmp_path, name="icl_tiny",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rows = {(r["method"], r["keep_label"]): r for r in result["results"]}
    assert not result["skipped"], result["skipped"]
    catp = next(r for (m, _), r in rows.items() if m == "catp")
    assert [s["name"] for s in catp["stages"]] == ["catp-diverse", "catp-context", "catp-query"]
    assert [s["layer"] for s in catp["stages"]] == [0, 2, 3]  # K = round(6 / 32 * 8) = 2
    # 5 images of 576: floor(576 * .222) = 127 each at the end
    assert catp["stages"][-1]["tokens_out"] == 5 * 127
    assert (tmp_path / "bench_icl_tiny.json").is_file()


def test_token_split_counts_demonstrations_and_query():
    model = _random_icl_model(layers=4)
    processor = _processor()
    inputs = episode_inputs(processor, make_episodes("test", 2, shots=3, words=DEMO_WORDS))
    with vlm_prune.pruned(model, "catp", keep=0.333) as handle, torch.no_grad():
        model(**inputs)
    # floor(576 * .333) = 191 per image: demonstrations pruned globally to 3 * 191, the query to 191
    assert token_split(handle.stats) == [{"demonstration": 3 * 191, "query": 191}] * 2

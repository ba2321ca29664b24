"""Segments of interleaved prompts (`engine.segments`) and attention rows of layers k-1 and k (`engine.attention_rows`).

The segment map the engine hands a stage is compared with a reference built by hand from the token ids: the
media items are the runs of placeholder ids, an item's paired text is what lies between the end of its run and the
start of the next run (markers such as Qwen's vision_start / vision_end excluded), up to the end for the last item.
Checked on every toy image family for 1-5 images, left and right padding with rows holding different numbers of
images, after a pre-LLM stage pruned tokens, under beam search and on a two-turn prompt. Attention rows of both
layers are compared with eager attention's `output_attentions` on the unwrapped model.
"""

from __future__ import annotations

import pytest
import torch

import vlm_prune
from vlm_prune.engine.segments import build_segments, interleaved_prompt
from vlm_prune.errors import InputError
from vlm_prune.methods.registry import get_method
from vlm_prune.toy_models import (
    FAMILIES,
    IMAGE_ID,
    VISION_END_ID,
    VISION_START_ID,
    available_families,
    build_tiny,
    make_inputs,
    single_row,
)

IMAGE_FAMILIES = [f for f in FAMILIES if f in available_families()]
MARKERS = {VISION_START_ID, VISION_END_ID}


def in_llm_layer(family: str) -> int:
    """An interior layer of the 4-layer toys where an in-LLM stage may run (Qwen3-VL: after its deepstack)."""
    return 3 if family == "qwen3_vl" else 2


def reference_segments(ids: list[int]) -> dict:
    """By hand: runs of IMAGE_ID are the items; each item's text runs to the next run (markers excluded)."""
    runs, start = [], None
    for pos, token in enumerate([*ids, -1]):
        if token == IMAGE_ID and start is None:
            start = pos
        elif token != IMAGE_ID and start is not None:
            runs.append((start, pos))
            start = None
    texts = []
    for item, (_, end) in enumerate(runs):
        stop = runs[item + 1][0] if item + 1 < len(runs) else len(ids)
        texts.append([ids[p] for p in range(end, stop) if ids[p] not in MARKERS])
    prefix = [ids[p] for p in range(runs[0][0] if runs else len(ids)) if ids[p] not in MARKERS]
    return {"counts": [e - s for s, e in runs], "texts": texts, "prefix": prefix}


class Recorder(vlm_prune.Method):
    """Keeps everything and records, per sample, the token ids of each segment as the stage sees them."""

    needs = frozenset()

    def __init__(self, layer: int = 0, query: int | None = None):
        self.layer, self.query, self.seen = layer, query, []

    def select(self, ctx):
        segments = ctx.segments if self.query is None else ctx.segments.with_query(self.query)
        ids = ctx.input_ids.cpu()
        self.seen.append(
            {
                "counts": list(segments.original_counts),
                "texts": [ids[segments.text_index(i)].tolist() for i in range(segments.num_media)],
                "prefix": ids[segments.prefix_index].tolist(),
                "query": segments.query_media,
                "demonstration_of_media": segments.demonstration_of_media.tolist(),
                "visual_media": ctx.layout.media_index.tolist(),
            }
        )
        return torch.ones(ctx.num_visual, dtype=torch.bool)


def _expected_rows(inputs: dict) -> list[dict]:
    return [reference_segments(single_row(inputs, r)["input_ids"][0].tolist()) for r in range(len(inputs["input_ids"]))]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_segments_match_the_hand_built_map_for_one_to_five_images(family):
    model = build_tiny(family)
    for num_images in range(1, 6):
        inputs = make_inputs(model, num_images=num_images)
        recorder = Recorder()
        with vlm_prune.pruned(model, recorder), torch.no_grad():
            model(**inputs)
        (seen,) = recorder.seen
        (expected,) = _expected_rows(inputs)
        assert len(expected["counts"]) == num_images
        assert seen["counts"] == expected["counts"]
        assert seen["texts"] == expected["texts"] and seen["prefix"] == expected["prefix"]
        assert seen["query"] == num_images - 1
        assert seen["demonstration_of_media"] == [*range(num_images - 1), -1]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_segments_under_padding_with_different_image_counts_per_row(family, padding):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, num_images=[3, 1, 2], padding=padding)
    recorder = Recorder(layer=in_llm_layer(family))  # in-LLM: mapped onto the current (unpadded) sequence
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    expected = _expected_rows(inputs)
    assert [s["counts"] for s in recorder.seen] == [e["counts"] for e in expected]
    assert [s["texts"] for s in recorder.seen] == [e["texts"] for e in expected]
    assert [s["prefix"] for s in recorder.seen] == [e["prefix"] for e in expected]
    assert [s["query"] for s in recorder.seen] == [2, 0, 1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_segments_survive_a_pre_llm_stage_and_stay_on_the_original_items(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, num_images=[4, 2])
    recorder = Recorder(layer=2)
    with vlm_prune.pruned(model, [get_method("random", keep=0.3), recorder]):
        with torch.no_grad():
            model(**inputs)
    expected = _expected_rows(inputs)
    for seen, want in zip(recorder.seen, expected):
        assert seen["counts"] == want["counts"]  # the UNPRUNED counts
        assert seen["texts"] == want["texts"]
        assert sorted(set(seen["visual_media"])) == list(range(len(want["counts"])))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_segments_under_beam_search_follow_each_beams_source_row(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, num_images=[3, 2])
    recorder = Recorder(layer=1)
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model.generate(**inputs, num_beams=2, max_new_tokens=3, do_sample=False)
    expected = _expected_rows(inputs)
    assert [s["texts"] for s in recorder.seen] == [e["texts"] for e in expected for _ in range(2)]
    assert [s["query"] for s in recorder.seen] == [2, 2, 1, 1]


MEDIA_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")


def _second_turn(inputs: dict, first: torch.Tensor, extra: list[int]) -> dict:
    """The conversation so far plus `extra` text tokens, with the first turn's media kwargs."""
    grown = first.shape[1] + len(extra) - inputs["input_ids"].shape[1]
    out = dict(inputs, input_ids=torch.cat([first, torch.tensor([extra])], dim=1))
    out["attention_mask"] = torch.nn.functional.pad(inputs["attention_mask"], (0, grown), value=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, grown))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_second_turn_keeps_the_split_and_extends_the_query_text(family):
    model = build_tiny(family)
    inputs = make_inputs(model, num_images=3)
    recorder = Recorder(layer=1)
    kwargs = dict(do_sample=False, return_dict_in_generate=True)
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        second = _second_turn(inputs, first.sequences, [40, 41, 42])
        # the second turn on the pruned cache: the stage does not run again, decoding continues
        text_only = {key: value for key, value in second.items() if key not in MEDIA_KEYS}
        model.generate(**text_only, cache=first.past_key_values, max_new_tokens=2, **kwargs)
        assert len(recorder.seen) == 1
        # the whole conversation as a fresh prefill: same items, same demonstrations, a longer query text
        model.generate(**second, max_new_tokens=1, **kwargs)
    turn_one, turn_two = recorder.seen[0], recorder.seen[-1]
    assert len(recorder.seen) == 2
    assert turn_two["counts"] == turn_one["counts"] and turn_two["query"] == turn_one["query"] == 2
    assert turn_two["texts"][:2] == turn_one["texts"][:2]
    assert turn_two["texts"][2] == turn_one["texts"][2] + first.sequences[0, -3:].tolist() + [40, 41, 42]


def test_a_named_query_and_an_out_of_range_query():
    model = build_tiny("llava")
    inputs = make_inputs(model, num_images=3)
    recorder = Recorder(query=0)
    with vlm_prune.pruned(model, recorder), torch.no_grad():
        model(**inputs)
    assert recorder.seen[0]["query"] == 0 and recorder.seen[0]["demonstration_of_media"] == [-1, 0, 1]
    with vlm_prune.pruned(model, Recorder(query=3)), pytest.raises(InputError, match="out of range"):
        model(**inputs)


def test_build_segments_on_a_hand_written_row():
    # columns: 0 pad, 1 bos, 2-3 image 0, 4 text, 5 marker, 6-7 image 1, 8 marker, 9-10 question
    ids = torch.tensor([0, 1, 3, 3, 20, 5, 3, 3, 6, 21, 22])
    current = torch.arange(1, 11)  # without the pad column
    visual = torch.tensor([2, 3, 6, 7])
    segments = build_segments(ids, current, visual, torch.tensor([0, 0, 1, 1]), marker_ids={3, 5, 6})
    assert segments.text_owner.tolist() == [-1, -1, -1, 0, -1, -1, -1, -1, 1, 1]
    assert segments.prefix_index.tolist() == [0] and segments.query_media == 1
    assert segments.original_counts == (2, 2) and segments.item_start.tolist() == [2, 6]
    assert segments.with_query(-2).demonstration_of_media.tolist() == [-1, 0]


def test_interleaved_prompt_through_the_chat_template():
    from vlm_prune.demo import demo_model_path, load_processor

    processor = load_processor(demo_model_path("llava"))
    prompt, images = interleaved_prompt(processor, [("a", "red"), ("b", "blue")], ("c", "what color ?"))
    assert images == ["a", "b", "c"]
    assert prompt == "USER: <image>\nred<image>\nblue<image>\nwhat color ? ASSISTANT:"


# ------------------------------------------------------------------------------------------- attention rows
class RowRecorder(vlm_prune.Method):
    """At layer k, records the attention rows of layers k-1 and k for a few queries (keeps everything)."""

    needs = frozenset({"attention"})

    def __init__(self, layer: int):
        self.layer, self.rows = layer, []

    def select(self, ctx):
        queries = torch.tensor([ctx.last_index, int(ctx.visual_index[-1]) + 1, 2])
        self.rows.append({layer: ctx.attention_rows(queries, layer=layer) for layer in (self.layer - 1, self.layer)})
        return torch.ones(ctx.num_visual, dtype=torch.bool)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen3_vl"])
def test_rows_of_layers_k_minus_1_and_k_equal_eager_attention(family):
    if family not in IMAGE_FAMILIES:
        pytest.skip(f"{family} is not in this transformers")
    eager = build_tiny(family, attn_implementation="eager")
    model = build_tiny(family)  # sdpa: the engine never needs eager attention
    inputs = make_inputs(model, batch=2, num_images=[2, 3], padding="left")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True).attentions
        recorder = RowRecorder(layer=in_llm_layer(family))
        with vlm_prune.pruned(model, recorder):
            model(**inputs)
    for row, recorded in enumerate(recorder.rows):
        valid = inputs["attention_mask"][row].bool()
        columns = valid.nonzero(as_tuple=True)[0]
        ids = inputs["input_ids"][row, columns]
        queries = torch.tensor([len(columns) - 1, int((ids == IMAGE_ID).nonzero().max()) + 1, 2])
        for layer, rows in recorded.items():
            want = reference[layer][row][:, columns[queries]][:, :, columns]
            torch.testing.assert_close(rows, want.float(), atol=2e-5, rtol=1e-4)
        assert not torch.allclose(*recorded.values())


def test_rows_of_another_layer_are_refused():
    model = build_tiny("llava")

    class Wrong(RowRecorder):
        def select(self, ctx):
            return ctx.attention_rows(ctx.last_index, layer=0)

    with vlm_prune.pruned(model, Wrong(layer=2)), pytest.raises(vlm_prune.PruneError, match="layers 1 and 2"):
        model(**make_inputs(model, num_images=2))

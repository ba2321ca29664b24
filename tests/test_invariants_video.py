"""DESIGN.md invariants on prompts holding video, on every video-capable toy family.

The image-prompt matrix lives in `test_invariants.py` (which also holds the video reference equivalence at
layer 0 and layer k, `test_reference_video`); this file adds the video variants of identity, batch rows,
a second turn, beams (also with methods that read the vision tower's recordings) and chunked prefill.
Identity and reference equivalence run on every prompt kind (a video alone, an image then a video, a video
then an image; vLLM's bug #27859 was the mixed case); the other tests use the mixed prompts, where the
bookkeeping of two media kinds can go wrong. To keep CI time in check each test runs sdpa at batch 2;
eager attention and right padding are covered by `test_invariants.py::test_reference_video_right_padding_and_eager`.
"""

from __future__ import annotations

import pytest
import torch
from test_invariants import (
    BEAMS,
    IDENTITY_TOL,
    NEW_TOKENS,
    STAGES,
    TOL,
    VIDEO_CAPABLE,
    VIDEO_MEDIA,
    _second_turn,
    _without_media,
    assert_rows_equal_rows_alone,
    forward,
    generate,
    inputs_for,
    keep_all_method,
    model_for,
    pattern_method,
    stage_layer,
)

import vlm_prune

torch.set_num_threads(1)


@pytest.mark.parametrize("media", list(VIDEO_MEDIA))
@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_video_identity_keep_all(family, media):
    """Keep-all at both stages: the unwrapped logits and greedy tokens."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", **VIDEO_MEDIA[media])
    base = forward(model, inputs).logits
    base_new, base_steps = generate(model, inputs)
    mask = inputs["attention_mask"].bool()
    for stage in STAGES:
        with vlm_prune.pruned(model, keep_all_method(stage_layer(family, stage))) as handle:
            got = forward(model, inputs).logits
            assert handle.stats.visual_tokens_in > 0, "the video tokens were found"
            new, steps = generate(model, inputs)
        torch.testing.assert_close(got[mask], base[mask], **IDENTITY_TOL)
        assert new.tolist() == base_new.tolist(), stage
        torch.testing.assert_close(steps, base_steps, **IDENTITY_TOL)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_video_batch_row_equals_row_alone(family, stage, padding):
    """Invariant 6 with an image and a video in every row (video first under left padding)."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, padding, video=True, video_first=padding == "left")
    assert_rows_equal_rows_alone(model, inputs, pattern_method(stage_layer(family, stage)), padding)


# On Qwen, generate() builds a follow-up's M-RoPE positions from `mm_token_type_ids[:, physical cache length:]`;
# when pruning removed more tokens than the prompt has after its last media token that slice reaches media
# placeholders and transformers zeroes `rope_deltas`. The engine rebuilds the positions from the prefill's deltas
# (`Adapter.follow_up_position_ids`); the "pre" cases below prune past the text tail and cover it.


@pytest.mark.parametrize(
    ("family", "stage"),
    [(f, s) for f in VIDEO_CAPABLE for s in STAGES],
)
def test_video_second_turn_on_the_pruned_cache(family, stage):
    """A second turn on the cache of a pruned video + image prompt equals a fresh pruned prefill."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", video=True)
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vlm_prune.pruned(model, pattern_method(stage_layer(family, stage)), trim_cache=False):
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        follow_up = _second_turn(inputs, first.sequences, [20, 21, 22, 23])
        fresh = model.generate(**follow_up, max_new_tokens=NEW_TOKENS, **kwargs)
        reused = model.generate(
            **_without_media(follow_up), cache=first.past_key_values, max_new_tokens=NEW_TOKENS, **kwargs
        )
    assert torch.equal(reused.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), **TOL)


@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_video_beams(family):
    """generate() expands each row's encoded video and image for beams: keep-all is the unwrapped beam search,
    and each beam keeps exactly the tokens greedy decoding of its row keeps."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", video=True, video_first=True)
    with torch.no_grad():
        expected = model.generate(**inputs, **BEAMS)
        with vlm_prune.pruned(model, keep_all_method(0)):
            assert torch.equal(model.generate(**inputs, **BEAMS), expected)
        assert_beams_keep_their_rows_tokens(model, inputs, pattern_method(0))


def assert_beams_keep_their_rows_tokens(model, inputs: dict, method, **options) -> None:
    """Under beam search every beam keeps exactly the tokens greedy decoding of its row keeps (and some are pruned)."""
    with torch.no_grad(), vlm_prune.pruned(model, method, **options) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        greedy_kept = handle.last_kept_index.clone()
        model.generate(**inputs, **BEAMS)
        beam_kept = handle.last_kept_index.clone()
    assert (greedy_kept >= 0).sum() < inputs["attention_mask"].sum(), "something was pruned"
    for row in range(inputs["input_ids"].shape[0]):
        for beam in range(BEAMS["num_beams"]):
            assert torch.equal(beam_kept[row * BEAMS["num_beams"] + beam], greedy_kept[row])


@pytest.mark.parametrize("family", VIDEO_CAPABLE)
def test_video_chunked_prefill(family):
    """generate(prefill_chunk_size=N) with every media token in the first chunk: the same media items and the
    same tokens as one prefill; a chunk boundary inside the media is refused."""
    from reference import VISUAL_IDS

    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", video=True)
    media_columns = torch.isin(inputs["input_ids"], torch.tensor(VISUAL_IDS)).nonzero()[:, 1]
    after_media = int(media_columns.max()) + 2
    assert after_media < inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vlm_prune.pruned(model, pattern_method(0)) as handle:
        whole = model.generate(**inputs, **kwargs)
        items_whole = handle.stats.stages[0].tokens_in
        chunked = model.generate(**inputs, prefill_chunk_size=after_media, **kwargs)
        assert handle.stats.stages[0].tokens_in == items_whole, "the same media items, not one merged block"
        with pytest.raises(vlm_prune.InputError, match="prefill_chunk_size"):
            model.generate(**inputs, prefill_chunk_size=int(media_columns.min()) + 1, **kwargs)
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), **TOL)


@pytest.mark.parametrize(
    ("family", "method"),
    [
        (f, m)
        for f in VIDEO_CAPABLE
        if f.startswith("qwen")
        for m in ("zoo", "visionzip")
        if (m, f) != ("visionzip", "qwen3_vl")  # Qwen3-VL: no vision-tower attention signal
    ],
)
def test_video_beams_with_vision_recordings(family, method):
    """Methods reading the vision tower's recordings (projector inputs, tower attention), which stay in the
    encoder's order (images, then videos) while generate() expands the rows: each beam keeps its row's tokens."""
    model = model_for(family, "sdpa")
    inputs = inputs_for(model, 2, "left", video=True, video_first=True)
    assert_beams_keep_their_rows_tokens(model, inputs, method, keep=0.5 if method == "zoo" else 4)

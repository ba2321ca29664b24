"""EVS: the kept set equals a literal reference of vLLM's `video_pruning_rate` semantics, the count function
equals the mask sum, and the engine keeps exactly those tokens at their original positions."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import capture, reference_row

import vlm_prune
from vlm_prune.errors import MediaKindError, MethodOptionError, PruneError
from vlm_prune.methods.evs import EVS, evs_keep_mask, retained_count
from vlm_prune.toy_models import VIDEO_ID, build_tiny, make_inputs, single_row

torch.set_num_threads(1)


def vllm_reference_mask(embeds: torch.Tensor, grid_thw: tuple[int, int, int], merge: int, q: float) -> torch.Tensor:
    """vLLM's `compute_retention_mask`, written out step by step from its description (raster (t, h, w) input)."""
    t, h, w = grid_thw
    hh, ww = h // merge, w // merge
    video = embeds.reshape(t, hh, ww, embeds.shape[-1])
    tokens_per_frame = hh * ww
    similarity = torch.nn.functional.cosine_similarity(video[1:], video[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(video[:1, :, :, 0]), 1 - similarity], dim=0)
    order = torch.argsort(dissimilarity.view(-1), dim=-1, descending=True, stable=True)
    count = max(tokens_per_frame, int(tokens_per_frame * t * (1 - q)))
    mask = torch.zeros(t * hh * ww, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def raster_coords(t: int, h: int, w: int) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], -1).reshape(-1, 3)


def tied_video(t: int, h: int, w: int, d: int, seed: int) -> torch.Tensor:
    """Random (t*h*w, d) embeddings with many exact ties: repeated steps and repeated cells."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(t, h, w, d, generator=g)
    video[1] = video[0]  # a whole step identical to the previous one: dissimilarity 0 everywhere
    if t > 3:
        video[3, :, : w // 2] = video[2, :, : w // 2]
    video[:, 0, 0] = video[:, 0, 1]  # identical cells: equal dissimilarities in one step
    video[-1] = 2.0 * video[-2]  # a scaled copy: cosine 1, dissimilarity 0 up to rounding
    return video.reshape(-1, d)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_mask_equals_vllm_reference_with_ties(seed, q):
    t, h, w = [(4, 3, 5), (6, 4, 4), (2, 2, 2), (8, 3, 3), (5, 1, 7), (3, 6, 2)][seed]
    embeds = tied_video(t, h, w, 8, seed)
    expected = vllm_reference_mask(embeds, (t, h, w), 1, q)
    got = evs_keep_mask(embeds, raster_coords(t, h, w), (t, h, w), q)
    assert torch.equal(got, expected)
    # tokens given in another order (e.g. a family whose sequence is not raster): same kept tokens
    perm = torch.randperm(t * h * w, generator=torch.Generator().manual_seed(seed))
    got_perm = evs_keep_mask(embeds[perm], raster_coords(t, h, w)[perm], (t, h, w), q)
    assert torch.equal(got_perm, expected[perm])


def test_mask_in_bfloat16_follows_the_embedding_dtype():
    embeds = tied_video(6, 4, 4, 16, 3).bfloat16()
    expected = vllm_reference_mask(embeds, (6, 4, 4), 1, 0.6)
    assert torch.equal(evs_keep_mask(embeds, raster_coords(6, 4, 4), (6, 4, 4), 0.6), expected)


def test_count_matches_formula_and_mask_sum_on_many_grids():
    for t, h, w in itertools.product([1, 2, 3, 7, 16], [2, 4, 6], [2, 4, 10]):
        for q in [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.99]:
            grid_merged = (t, h // 2, w // 2)
            count = retained_count((t, h, w), q, spatial_merge_size=2)
            assert count == retained_count(grid_merged, q) == EVS.count(torch.tensor(grid_merged), q)
            tokens_per_frame = (h // 2) * (w // 2)
            assert count == max(tokens_per_frame, int(tokens_per_frame * t * (1 - q)))
            embeds = torch.randn(t * tokens_per_frame, 4)
            assert int(evs_keep_mask(embeds, raster_coords(*grid_merged), grid_merged, q).sum()) == count


def test_count_hand_values():
    assert retained_count((4, 8, 8), 0.75, spatial_merge_size=2) == 16  # 4 steps x 16 tokens x 0.25
    assert retained_count((4, 4, 4), 0.9) == 16  # never below one step
    assert retained_count((10, 3, 3), 1 / 3) == 60  # int(90 * 2/3) = 60 (float arithmetic as vLLM)
    assert retained_count((7, 2, 2), 0.0) == 28


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True, float("nan")])
def test_bad_rate_is_refused(bad):
    with pytest.raises(MethodOptionError, match="rate"):
        retained_count((2, 2, 2), bad)
    with pytest.raises(MethodOptionError, match="rate"):
        EVS(rate=bad)


@pytest.fixture(scope="module")
def qwen():
    return build_tiny("qwen2_vl")


def _video_rows(inputs: dict, row: int) -> tuple[torch.Tensor, list]:
    """(N_video, 3) video grids of one row (merged), the order of its video items."""
    grids = inputs["video_grid_thw"]
    per_row = grids.shape[0] // inputs["input_ids"].shape[0]
    return grids[row * per_row : (row + 1) * per_row]


@pytest.fixture(scope="module")
def qwen_family():
    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny(family)
        return built[family]

    return get


@pytest.mark.parametrize(
    "family, padding, video_first",
    [
        ("qwen2_vl", "left", False),
        ("qwen2_vl", "right", True),
        ("qwen2_5_vl", "left", True),
        ("qwen3_vl", "left", False),
        ("qwen3_vl", "left", True),
    ],
)
def test_engine_keeps_the_reference_set_and_positions(qwen_family, family, padding, video_first):
    """A video + an image per row (both orders: vLLM #27859; Qwen3-VL's timestamp tokens between frames: #30847):
    EVS prunes the video exactly as vLLM's rule on the model's embeddings, leaves the image alone, and the pruned
    logits equal the hand-built reference run with that keep set at the original positions."""
    qwen = qwen_family(family)
    inputs = make_inputs(
        qwen, batch=2, padding=padding, video=True, num_images=1, video_grid=(6, 8, 8), video_first=video_first
    )
    cap = capture(qwen, inputs)
    q = 0.6
    with vlm_prune.pruned(qwen, "evs", rate=q) as handle:
        logits = qwen(**inputs).logits
    kept_index = handle.last_kept_index
    for row in range(2):
        cols = cap.attention_mask[row].bool().nonzero(as_tuple=True)[0]
        ids = cap.input_ids[row, cols]
        visual = (ids == VIDEO_ID) | (ids == 3)
        keep_visual = torch.ones(int(visual.sum()), dtype=torch.bool)
        video_slots = (ids[visual] == VIDEO_ID).nonzero(as_tuple=True)[0]
        (t, h, w), = _video_rows(inputs, row).tolist()
        embeds = cap.inputs_embeds[row, cols][ids == VIDEO_ID]
        keep_visual[video_slots] = vllm_reference_mask(embeds, (t, h, w), 2, q)
        assert int(keep_visual[video_slots].sum()) == retained_count((t, h, w), q, 2)
        ref = reference_row(qwen, cap, row, keep_visual)
        valid = (kept_index[row] >= 0) & (inputs["attention_mask"][row, kept_index[row].clamp(min=0)] == 1)
        assert torch.equal(kept_index[row][valid].cpu(), ref.kept_cols)
        slots = valid.nonzero(as_tuple=True)[0]
        torch.testing.assert_close(logits[row, slots], ref.logits, atol=2e-5, rtol=1e-4)


def test_images_left_alone_and_composition(qwen):
    inputs = make_inputs(qwen, batch=1, video=True, num_images=1, video_grid=(4, 8, 8))
    with vlm_prune.pruned(qwen, "evs+divprune", keep=0.25) as handle:
        qwen.generate(**inputs, max_new_tokens=2)
    evs_stage, div_stage = handle.stats.stages
    (image_in, video_in), = evs_stage.tokens_in
    (image_out, video_out), = evs_stage.tokens_out
    assert image_out == image_in  # images untouched by EVS
    assert video_out == retained_count((4, 4, 4), 0.5)  # keep 0.25 split geometrically: EVS keeps 0.5
    (image_final, video_final), = div_stage.tokens_out
    assert image_final == max(1, int(0.25 * image_in + 0.5))
    assert video_final == min(video_out, int(0.25 * video_in + 0.5))


def test_keep_means_one_minus_rate(qwen):
    inputs = make_inputs(qwen, batch=1, video=True, num_images=0, video_grid=(6, 8, 8))
    kept = []
    for kwargs in (dict(keep=0.25), dict(rate=0.75)):
        with vlm_prune.pruned(qwen, "evs", **kwargs) as handle:
            qwen(**inputs)
        kept.append(handle.last_kept_index)
    assert torch.equal(kept[0], kept[1])


def test_errors(qwen):
    image_only = make_inputs(qwen, batch=1)
    with vlm_prune.pruned(qwen, "evs", keep=0.5):
        with pytest.raises(MediaKindError, match="(?s)EVS.*image method"):
            qwen(**image_only)
    with pytest.raises(MethodOptionError, match="fraction"):
        vlm_prune.apply(qwen, "evs", keep=16)
    with pytest.raises(MethodOptionError, match="pass one"):
        vlm_prune.apply(qwen, "evs", keep=0.5, rate=0.3)
    with pytest.raises(MethodOptionError, match="space"):
        vlm_prune.apply(qwen, "evs", space="rgb")
    # EVS needs whole temporal steps: after another pre-LLM stage the grid is incomplete
    inputs = make_inputs(qwen, batch=1, video=True, num_images=0, video_grid=(4, 8, 8))
    with vlm_prune.pruned(qwen, "random+evs", keep=0.5):
        with pytest.raises(PruneError, match="run EVS first"):
            qwen(**inputs)


def test_batch_row_equals_row_alone(qwen):
    inputs = make_inputs(qwen, batch=2, padding="left", video=True, num_images=1, video_grid=(6, 8, 8))
    with vlm_prune.pruned(qwen, "evs", keep=0.3) as handle:
        batch_out = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
        for row in range(2):
            alone = single_row(inputs, row)
            out = qwen.generate(**alone, max_new_tokens=4, do_sample=False)
            assert torch.equal(out[0, -4:], batch_out[row, -4:])
    assert handle.stats.stages[0].name == "evs"


def test_pixel_space_keeps_the_tokens_whose_pixels_changed(qwen):
    """space='pixel': the mean L1 change of each merged token's pixels since the previous step, from the vision
    tower's own input. A video whose pixels change only in chosen cells keeps exactly those cells (plus step 0)."""
    from vlm_prune.methods.evs import pixel_dissimilarity

    inputs = make_inputs(qwen, batch=1, video=True, num_images=0, video_grid=(4, 8, 8))
    merge = 2
    t, h, w = 4, 4, 4  # merged grid
    rows = inputs["pixel_values_videos"].reshape(t, h, w, -1)  # processor order: merge groups in raster order
    static = rows[:1].expand(t, -1, -1, -1).clone()  # every step equal to step 0 ...
    changed = [(1, 0, 3), (2, 2, 2), (3, 1, 1), (3, 3, 0)]  # ... except these (step, row, col)
    for step, r, c in changed:
        static[step, r, c] += 1.0 + step
    inputs["pixel_values_videos"] = static.reshape(-1, rows.shape[-1] // (merge * merge))
    dissimilarity = pixel_dissimilarity(static)
    assert (dissimilarity[0] == 255).all() and int((dissimilarity[1:] > 0).sum()) == 6  # changes, and 2 undone
    with vlm_prune.pruned(qwen, "evs", rate=0.6, space="pixel") as handle:
        qwen(**inputs)
    count = retained_count((t, h, w), 0.6)  # 25: step 0 (16) + the 9 largest of the rest
    (video_out,), = handle.stats.stages[0].tokens_out
    assert video_out == count
    kept = handle.last_kept_index[0]
    video_cols = (inputs["input_ids"][0] == VIDEO_ID).nonzero(as_tuple=True)[0]
    kept_video = torch.isin(video_cols, kept).view(t, h, w)
    assert kept_video[0].all()
    for step, r, c in changed:
        assert kept_video[step, r, c]
    expected = vllm_reference_mask(torch.zeros(t * h * w, 1), (t, h, w), 1, 0.6)  # only for its count
    assert int(kept_video.sum()) == int(expected.sum())


def test_frames_that_disagree_with_the_grid_are_refused(qwen):
    inputs = make_inputs(qwen, batch=1, video=True, num_images=0, video_grid=(4, 8, 8))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][:-64]  # one temporal step of patches missing
    with vlm_prune.pruned(qwen, "evs", keep=0.5), pytest.raises(vlm_prune.errors.InputError, match="video_grid_thw"):
        qwen(**inputs)
    with vlm_prune.pruned(qwen, "evs", keep=0.5), pytest.raises(vlm_prune.errors.InputError, match="grid"):
        qwen.generate(**inputs, max_new_tokens=2)  # generate() encodes the video before the forward


def test_embedded_video_model_keeps_the_vllm_set():
    """On the embedded video model and real clips (a batch of 3, left padded): the engine keeps exactly the
    tokens vLLM's rule keeps on the model's own video embeddings."""
    from vlm_prune.demo import demo_model
    from vlm_prune.tasks.video import eval_samples, video_inputs

    model, processor = demo_model("qwen2_vl_video")
    inputs = video_inputs(processor, eval_samples(3, seed=5))
    cap = capture(model, inputs)
    video_id = model.config.video_token_id
    with vlm_prune.pruned(model, "evs", rate=0.6) as handle:
        model(**inputs)
    for row, grid in enumerate(inputs["video_grid_thw"].tolist()):
        cols = (inputs["input_ids"][row] == video_id).nonzero(as_tuple=True)[0]
        expected = vllm_reference_mask(cap.inputs_embeds[row, cols], tuple(grid), 2, 0.6)
        kept = torch.isin(cols, handle.last_kept_index[row])
        assert torch.equal(kept, expected)
        assert int(kept.sum()) == retained_count(grid, 0.6, spatial_merge_size=2)

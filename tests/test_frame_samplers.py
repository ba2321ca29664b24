"""Frame samplers: each result below is worked out by hand in the comment next to it."""

from __future__ import annotations

import numpy as np
import pytest

from vlm_prune.video import samplers as S


def test_uniform_is_bin_centres_and_can_pick_the_last_frame():
    # N=10, k=4: bins of 2.5 frames, centres 1.25, 3.75, 6.25, 8.75 -> floor
    assert S.uniform_indices(10, 4) == [1, 3, 6, 8]
    # N=3, k=2: centres 0.75, 2.25 -> the last frame (2); transformers' arange(0, 3, 1.5) gives [0, 1]
    assert S.uniform_indices(3, 2) == [0, 2]
    assert np.arange(0, 3, 3 / 2).astype(int).tolist() == [0, 1]
    assert S.uniform_indices(5, 5) == [0, 1, 2, 3, 4]
    assert S.uniform_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than asked: all of them
    # the iscc-samples demo.mp4: 1441 frames, 16 picks, bins of 90.0625 frames
    assert S.uniform_indices(1441, 16)[:2] == [45, 135] and S.uniform_indices(1441, 16)[-1] == 1395


def test_candidates_are_score_fps_per_second_and_at_least_k():
    # 1441 frames at 24 fps = 60.04 s -> 60 candidates at 1 fps, centred in 60 bins
    assert S.candidate_indices(1441, 24.0, 16) == S.uniform_indices(1441, 60)
    # 8 frames at 4 fps = 2 s -> 2 per second < k=4 -> 4 candidates
    assert S.candidate_indices(8, 4.0, 4) == [1, 3, 5, 7]
    assert S.candidate_indices(8, 4.0, 2, score_fps=10) == list(range(8))  # capped at every frame


def test_clip_topk_takes_the_most_similar_in_time_order_ties_to_the_earlier():
    assert S.clip_topk([0.1, 0.9, 0.3, 0.95, 0.2], 2) == [1, 3]
    assert S.clip_topk([0.5, 0.5, 0.5, 0.5], 2) == [0, 1]
    assert S.clip_topk([3.0, 1.0, 2.0], 5) == [0, 1, 2]


def test_bolt_weights_are_minmax_scaled_to_the_power_alpha():
    # [0, 1, 2, 3] -> [0, 1/3, 2/3, 1] ** 3 = [0, 1, 8, 27] / 27 -> normalised by 36/27
    np.testing.assert_allclose(S.bolt_weights([0, 1, 2, 3], alpha=3), np.array([0, 1, 8, 27]) / 36)
    np.testing.assert_allclose(S.bolt_weights([2, 2, 2], alpha=3), [1 / 3] * 3)  # constant: uniform


def test_bolt_inverse_transform_sampling_by_hand():
    # constant similarity: cdf 0.1, 0.2, ..., 1; quantiles .125 .375 .625 .875 -> 1, 3, 6, 8 (= uniform's)
    assert S.bolt([5.0] * 10, 4) == [1, 3, 6, 8] == S.uniform_indices(10, 4)
    # weights [0, 1, 8, 27]/36: cdf [0, .028, .25, 1]; k=3 quantiles 1/6, 1/2, 5/6 -> 2, 3, 3;
    # the second 3 collides and moves to the nearest free candidate (2 is taken, 4 is past the end) -> 1
    assert S.bolt([0, 1, 2, 3], 3) == [1, 2, 3]
    # a single peak: every quantile lands on it, the rest go to its nearest free neighbours, left first
    assert S.bolt([0, 0, 1, 0, 0], 2) == [1, 2]
    # alpha sharpens: at alpha=1 the quantiles of [0, 1, 2, 3] (cdf 0, 1/6, 1/2, 1) are 1/6 -> 1, 1/2 -> 2, 5/6 -> 3
    assert S.bolt([0, 1, 2, 3], 3, alpha=1.0) == [1, 2, 3]
    # a relevant stretch gets the frames: all the mass is in the second half
    sim = [0.0] * 8 + [1.0] * 8
    picks = S.bolt(sim, 4)
    assert all(p >= 8 for p in picks)  # zero weight in the first half: cdf is 0 there, every quantile is > 0


def test_aks_concentrated_relevance_takes_the_top_frames():
    # 32 frames, 4 of them relevant (1) and the rest 0: top-4 mean 1 - mean 0.125 = 0.875 > t1 = 0.8 -> no split
    sim = np.zeros(32)
    sim[[3, 4, 5, 6]] = 1.0
    assert S.aks(sim, 4) == [3, 4, 5, 6]
    # uniform would spread them instead
    assert S.uniform_indices(32, 4) == [4, 12, 20, 28]


def test_aks_spread_relevance_splits_for_coverage():
    # a ramp 0..1 over 16 frames, k=4: root top-4 mean 0.9 - mean 0.5 < 0.8 -> split into halves with 2 each,
    # again into quarters with 1 each; a budget of 1 ends at its segment's best frame -> each quarter's last
    assert S.aks(np.linspace(0, 1, 16), 4) == [3, 7, 11, 15]
    # an odd budget's extra frame goes to the half with the higher maximum:
    # [0]*6 + [1, 1], k=2 -> halves get 1 + 1; the right half [0, 0, 1, 1] ends at frame 6; the left at frame 0
    assert S.aks([0, 0, 0, 0, 0, 0, 1, 1], 2) == [0, 6]


def test_aks_depth_limit_takes_top_frames_of_each_leaf():
    # max_depth=1: the root splits once into halves of budget 2 each, and each takes its top 2
    sim = [0.0, 0.2, 0.1, 0.3, 1.0, 0.9, 0.0, 0.05]
    assert S.aks(sim, 4, max_depth=1) == [1, 3, 4, 5]
    assert S.aks(sim, 4, max_depth=0) == [1, 3, 4, 5]  # no split: the global top 4 (1.0, 0.9, 0.3, 0.2)


@pytest.mark.parametrize("name", S.RELEVANCE_SAMPLERS)
def test_every_sampler_returns_k_distinct_sorted_positions(name):
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 80))
        k = int(rng.integers(1, 20))
        sim = rng.normal(size=n) if trial % 3 else np.round(rng.random(n), 1)  # with ties
        picks = S.select(name, sim, k)
        assert picks == sorted(set(picks)) and len(picks) == min(k, n)
        assert all(0 <= p < n for p in picks)


def test_errors_say_what_to_pass():
    with pytest.raises(S.SamplerError, match="positive int"):
        S.uniform_indices(10, 0)
    with pytest.raises(S.SamplerError, match="NaN"):
        S.bolt([0.0, float("nan")], 1)
    with pytest.raises(S.SamplerError, match="choose one of"):
        S.select("random", [0.0], 1)


def test_is_uniform():
    assert S.is_uniform(S.uniform_indices(1441, 16))  # gaps of 90 and 91 frames (rounding)
    assert S.is_uniform([5])
    assert not S.is_uniform([0, 10, 40])

"""PruneVid: DPC-kNN and segment refinement against literal references, the merge against hand-built videos,
and the engine run against the hand-built reference with the merged features."""

from __future__ import annotations

import pytest
import torch
from reference import capture, reference_row

import vlm_prune
from vlm_prune.errors import MediaKindError, MethodOptionError
from vlm_prune.methods.dpc_knn import cluster_means, contiguous_segments, dpc_knn
from vlm_prune.methods.prunevid import PruneVid, merge_video, share_budget, static_locations
from vlm_prune.toy_models import VIDEO_ID, build_tiny, make_inputs, single_row

torch.set_num_threads(1)


def reference_dpc_knn(x: torch.Tensor, cluster_num: int, k: int, jitter: torch.Tensor) -> torch.Tensor:
    """PruneVid's `cluster_dpc_knn` for one sample (batch dim dropped), with the jitter passed in."""
    n, c = x.shape
    dist = torch.cdist(x.float(), x.float()) / (c**0.5)
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest**2).mean(dim=-1)).exp() + jitter * 1e-6
    mask = (density[None, :] > density[:, None]).float()
    dist_max = dist.max()
    parent_dist, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    score = parent_dist * density
    _, centres = torch.topk(score, k=cluster_num, dim=-1)
    labels = dist[centres].argmin(dim=0)
    labels[centres] = torch.arange(cluster_num)
    return labels


@pytest.mark.parametrize("seed", range(5))
def test_dpc_knn_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, clusters = [(30, 7), (16, 8), (50, 3), (9, 9), (40, 20)][seed]
    x = torch.randn(n, 12, generator=g)
    labels, centres = dpc_knn(x, clusters, k=5, generator=torch.Generator().manual_seed(99))
    jitter = torch.rand(n, generator=torch.Generator().manual_seed(99))
    assert torch.equal(labels, reference_dpc_knn(x, clusters, 5, jitter))
    assert torch.equal(labels[centres], torch.arange(clusters))
    means = cluster_means(x, labels, clusters)
    for cluster in range(clusters):
        torch.testing.assert_close(means[cluster], x[labels == cluster].mean(dim=0))


def test_dpc_knn_finds_obvious_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(6, 2, generator=g) for c in centres])
    labels, _ = dpc_knn(x, 3, k=3, generator=g)
    blocks = labels.view(3, 6)
    assert all(len(set(block.tolist())) == 1 for block in blocks) and len(set(blocks[:, 0].tolist())) == 3


@pytest.mark.parametrize(
    "labels, lengths",
    [
        ([0, 0, 1, 1, 0, 1, 1, 1], [2, 6]),  # runs kept: 0 @ [0,2), 1 @ [5,8); the gap joins the longer neighbour
        ([0, 1, 0, 1], [4]),  # only single-frame runs: everything relabelled to 0
        ([2, 2, 2, 0, 0, 1], [3, 3]),  # the lone 1 joins its only neighbour
        ([3, 3, 1, 1, 3, 3], [2, 2, 2]),  # two longest runs of 3 both kept
        ([5], [1]),
        ([1, 1, 1, 1], [4]),
        ([0, 0, 2, 1, 1], [3, 2]),  # tie between neighbours of equal length: the left one
    ],
)
def test_contiguous_segments(labels, lengths):
    assert contiguous_segments(labels) == lengths


def test_static_locations_brute_force():
    g = torch.Generator().manual_seed(1)
    segment = torch.randn(4, 10, 6, generator=g)
    segment[:, :4] = segment[:1, :4] + 0.05 * torch.randn(4, 4, 6, generator=g)  # nearly constant locations
    got = static_locations(segment, 0.8)
    for s in range(10):
        sims = [
            torch.nn.functional.cosine_similarity(segment[i, s], segment[j, s], dim=0)
            for i in range(4)
            for j in range(4)
            if i != j
        ]
        assert bool(got[s]) == bool(torch.stack(sims).mean() > 0.8)
    assert got[:4].all()
    assert not static_locations(segment[:1], -1.0).any()  # one step: no pairs, all dynamic


def test_merge_hand_built_video():
    """4 steps of a 2x3 grid: locations 0 and 4 never change (static), the others change every step.
    One segment (int(4 * 0.25) = 1), groups too small to cluster (min_size large)."""
    g = torch.Generator().manual_seed(2)
    steps, h, w, d = 4, 2, 3, 8
    video = torch.randn(steps, h * w, d, generator=g)
    video[:, 0] = video[0, 0]
    video[:, 4] = video[0, 4] * torch.tensor([1.0, 1.01, 0.99, 1.0]).view(4, 1)  # scaled: cosine 1
    merged = merge_video(video.view(steps, h, w, d), min_size=100)
    assert merged.segments == [4]
    expected_keep = torch.ones(steps * h * w, dtype=torch.bool)
    expected_keep[[6, 12, 18, 10, 16, 22]] = False  # static locations 0 and 4 keep only their step-0 token
    assert torch.equal(merged.keep_mask, expected_keep)
    kept = expected_keep.nonzero(as_tuple=True)[0].tolist()
    flat = video.reshape(-1, d)
    for token, feature, members, group in zip(kept, merged.features, merged.members, merged.group.tolist()):
        location, step = token % (h * w), token // (h * w)
        if location in (0, 4):
            assert members.tolist() == [location + (h * w) * s for s in range(steps)] and group == 0
            torch.testing.assert_close(feature, video[:, location].mean(dim=0))
        else:
            assert members.tolist() == [token] and group == 1 + step  # dynamic group of its step
            torch.testing.assert_close(feature, flat[token])


def test_merge_clusters_and_segments():
    """Two clearly different halves in time: two segments; large groups are clustered to half their size."""
    g = torch.Generator().manual_seed(3)
    steps, h, w, d = 8, 4, 5, 16
    first, second = torch.randn(h * w, d, generator=g), 5 + torch.randn(h * w, d, generator=g)
    video = torch.cat([first.expand(4, -1, -1), second.expand(4, -1, -1)]).clone()
    video += 0.01 * torch.randn(video.shape, generator=g)
    merged = merge_video(video.view(steps, h, w, d), generator=g)
    assert merged.segments == [4, 4]
    assert int(merged.keep_mask.sum()) == 2 * int(h * w * 0.5)  # all static, 20 > 14 -> 10 clusters a segment
    flat = video.reshape(-1, d)
    covered = torch.cat(merged.members)
    assert torch.equal(torch.sort(covered).values, torch.arange(steps * h * w))  # a partition of the video
    for token, feature, members in zip(merged.keep_mask.nonzero(as_tuple=True)[0], merged.features, merged.members):
        assert int(members[0]) == int(token)  # the representative is the first member
        torch.testing.assert_close(feature, flat[members].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_share_budget():
    assert share_budget([10, 10, 20], 8) == [2, 2, 4]
    assert share_budget([3, 3, 3], 4) == [2, 1, 1]  # largest remainder, ties to the first
    assert share_budget([5, 1], 100) == [5, 1]
    assert sum(share_budget([7, 11, 13, 2], 9)) == 9


@pytest.fixture(scope="module")
def qwen():
    return build_tiny("qwen2_vl")


@pytest.mark.parametrize("tau", [0.8, 1.0])  # toy frames are static (all merged); tau 1 makes them all dynamic
def test_engine_merge_equals_reference(qwen, tau):
    """alpha = 1 keeps everything at layer M, so the output is the merge alone: equal to the hand-built run
    with the merged features at their representatives' slots (original positions) and the rest dropped."""
    inputs = make_inputs(qwen, batch=2, padding="left", video=True, num_images=1, video_grid=(8, 8, 8))
    cap = capture(qwen, inputs)
    with vlm_prune.pruned(qwen, "prunevid", alpha=1.0, tau=tau) as handle:
        logits = qwen(**inputs).logits
    kept_index = handle.last_kept_index
    for row in range(2):
        cols = cap.attention_mask[row].bool().nonzero(as_tuple=True)[0]
        ids = cap.input_ids[row, cols]
        visual_cols = cols[(ids == VIDEO_ID) | (ids == 3)]
        video_cols = cols[ids == VIDEO_ID]
        (t, h, w), = inputs["video_grid_thw"][row : row + 1].tolist()
        grid = (t, h // 2, w // 2)
        embeds = cap.inputs_embeds[row, video_cols]
        merged = merge_video(embeds.view(*grid, -1), tau=tau, generator=torch.Generator().manual_seed(0))
        keep_visual = torch.ones(len(visual_cols), dtype=torch.bool)
        video_in_visual = torch.isin(visual_cols, video_cols)
        keep_visual[video_in_visual] = merged.keep_mask
        edited = capture(qwen, inputs)
        edited.inputs_embeds[row, video_cols[merged.keep_mask]] = merged.features
        ref = reference_row(qwen, edited, row, keep_visual)
        valid = (kept_index[row] >= 0) & (inputs["attention_mask"][row, kept_index[row].clamp(min=0)] == 1)
        assert torch.equal(kept_index[row][valid], ref.kept_cols)
        torch.testing.assert_close(logits[row, valid.nonzero(as_tuple=True)[0]], ref.logits, atol=2e-5, rtol=1e-4)
    assert handle.stats.stages[0].name == "prunevid-merge"


def test_engine_alpha_counts_per_group_and_budget_mode(qwen):
    inputs = make_inputs(qwen, batch=2, padding="left", video=True, num_images=1, video_grid=(8, 8, 8))
    with vlm_prune.pruned(qwen, "prunevid", tau=1.0, alpha=0.4) as handle:
        qwen(**inputs)
    merge, prune = handle.stats.stages
    for before, after in zip(prune.tokens_in, prune.tokens_out):
        image_before, video_before = before
        assert after[0] == image_before  # images untouched without a budget
        assert after[1] == (video_before // 8) * max(1, int(0.4 * 8))  # 8 dynamic groups of 8 cluster means
    with vlm_prune.pruned(qwen, "prunevid", keep=0.1, tau=1.0) as handle:
        qwen(**inputs)
    for before, after in zip(handle.stats.stages[0].tokens_in, handle.stats.stages[1].tokens_out):
        assert after == [max(1, int(0.1 * n + 0.5)) for n in before]


def test_engine_batch_rows_and_determinism(qwen):
    inputs = make_inputs(qwen, batch=2, padding="left", video=True, num_images=1, video_grid=(8, 8, 8))
    with vlm_prune.pruned(qwen, "prunevid", tau=1.0, seed=3) as handle:
        out = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
        again = qwen.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, again)
        for row in range(2):
            alone = qwen.generate(**single_row(inputs, row), max_new_tokens=4, do_sample=False)
            assert torch.equal(alone[0, -4:], out[row, -4:])
    caches = handle.stats
    assert caches.kv_cache_bytes < caches.kv_cache_bytes_unpruned


def test_errors_and_layer_default(qwen):
    with vlm_prune.pruned(qwen, "prunevid"):
        with pytest.raises(MediaKindError, match="PruneVid"):
            qwen(**make_inputs(qwen))
    with pytest.raises(MethodOptionError, match="alpha"):
        PruneVid(alpha=0.0)
    with pytest.raises(MethodOptionError, match="layer"):
        PruneVid(layer=0)
    handle = vlm_prune.apply(qwen, "prunevid")
    try:
        assert [stage.layer for stage in handle.stages] == [0, 1]  # round(10 / 28 * 4 layers)
    finally:
        handle.remove()
    assert PruneVid().resolved_layer() == 10

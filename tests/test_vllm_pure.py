"""vLLM plugin, tier 1: the pure functions (count, selection, positions) against references; no engine.

Runs in .venv-vllm (scripts/vllm_env.sh; scripts/test.sh runs it): vLLM's own EVS and M-RoPE functions are the
references for ours.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

pytest.importorskip("vllm", reason="the vLLM tests run in .venv-vllm (bash scripts/vllm_env.sh)")

from vllm.multimodal.video_prune import evs as vllm_evs  # noqa: E402

from vlm_prune.adapters.base import ProjectorParts  # noqa: E402
from vlm_prune.errors import PruneError  # noqa: E402
from vlm_prune.integrations.vllm import compat  # noqa: E402
from vlm_prune.integrations.vllm.positions import (  # noqa: E402
    decode,
    encode,
    frames_layout,
    grid_layout,
    media_columns,
    prompt_positions,
    write_media_positions,
)
from vlm_prune.integrations.vllm.select import ItemSignals, item_positions, raster_grid, select_item  # noqa: E402
from vlm_prune.integrations.vllm.spec import count, parse_spec  # noqa: E402
from vlm_prune.methods.divprune import maxmin_diversity  # noqa: E402
from vlm_prune.methods.evs import evs_keep_mask, retained_count  # noqa: E402

GRIDS = [(1, 2, 2), (1, 4, 6), (1, 6, 4), (1, 10, 14), (2, 4, 4), (3, 6, 8), (4, 2, 10)]  # vision grids, merge 2
KEEPS = [0.05, 0.25, 0.5, 0.9, 1.0, 1, 3, 7, 10_000]


def _signals(n: int, d_in: int, generator: torch.Generator) -> ItemSignals:
    w0 = torch.randn(32, d_in, generator=generator) / d_in**0.5
    tail = nn.Sequential(nn.GELU(), nn.Linear(32, 16))
    inputs = torch.randn(n, d_in, generator=generator)
    return ItemSignals(projector_inputs=inputs, projector=ProjectorParts(w0, None, tail))


@pytest.mark.parametrize("method", ["random", "pool", "divprune", "zoo", "evs"])
def test_mask_total_equals_count_for_many_grids_and_budgets(method: str) -> None:
    generator = torch.Generator().manual_seed(0)
    checked = 0
    keeps = KEEPS if method in ("random", "divprune", "evs") else KEEPS[::2]  # pool and zoo cost more per call
    for grid, keep, modality in itertools.product(GRIDS, keeps, ("image", "video")):
        if method == "evs" and (isinstance(keep, int) or modality == "image"):
            continue
        spec = parse_spec({"method": method, "keep": keep})
        t, h, w = grid
        token_grid = (t, h // 2, w // 2)
        n = t * (h // 2) * (w // 2)
        features = torch.randn(n, 16, generator=generator)
        signals = _signals(n, 8, generator) if method == "zoo" else None
        keep_mask, kept = select_item(features, token_grid, modality, spec, signals=signals)
        expected = count(grid, spec, modality, merge_size=2)
        assert int(keep_mask.sum()) == kept.shape[0] == expected, (grid, keep, modality)
        assert expected <= n
        checked += 1
    assert checked >= 30 if method != "pool" and method != "zoo" else checked >= 20


def test_selection_is_the_methods_own_code() -> None:
    """divprune through the plugin keeps exactly DivPrune's greedy picks; merged pool rows replace the kept ones."""
    features = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    keep_mask, kept = select_item(features, (1, 4, 6), "image", parse_spec({"method": "divprune", "keep": 5}))
    expected = torch.zeros(24, dtype=torch.bool)
    expected[maxmin_diversity(features, 5)] = True
    assert torch.equal(keep_mask, expected) and torch.equal(kept, features[expected])
    keep_mask, kept = select_item(features, (1, 4, 6), "image", parse_spec({"method": "pool", "keep": 6}))
    assert int(keep_mask.sum()) == 6 and not torch.equal(kept, features[keep_mask])  # cell means
    assert torch.allclose(kept.mean(0), features.mean(0), atol=1e-5)  # 6 equal 2x2 cells tile the 4x6 grid


@pytest.mark.parametrize("grid,rate", [((2, 4, 4), 0.5), ((4, 6, 8), 0.75), ((3, 10, 6), 0.3), ((8, 2, 2), 0.9)])
def test_our_evs_equals_vllms(grid: tuple[int, int, int], rate: float) -> None:
    t, h, w = grid  # LLM grid
    embeds = torch.randn(t * h * w, 32, generator=torch.Generator().manual_seed(t * 100 + h))
    theirs = vllm_evs.compute_retention_mask(embeds, (t, 2 * h, 2 * w), spatial_merge_size=2, q=rate)
    ours = evs_keep_mask(embeds, raster_grid(t, h, w), grid, rate)
    assert torch.equal(ours, theirs)
    assert retained_count((t, 2 * h, 2 * w), rate, 2) == vllm_evs.compute_retained_tokens_count(h * w, t, rate)
    keep_mask, _ = select_item(embeds, grid, "video", parse_spec({"method": "evs", "rate": rate}))
    assert torch.equal(keep_mask, theirs)


def _hf_positions(ids: list[int], image_grid, video_grid, second_per_grid: float):
    from transformers import Qwen2_5_VLModel

    from vlm_prune.integrations.vllm import testing

    config = testing.build_config("tiny")
    model = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)
    nn.Module.__init__(model)
    model.config = config
    input_ids = torch.tensor([ids])
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == testing.IMAGE_PAD] = 1
    types[input_ids == testing.VIDEO_PAD] = 2
    positions, _ = model.get_rope_index(
        input_ids, types, torch.tensor([image_grid]), torch.tensor([video_grid]), torch.tensor([second_per_grid])
    )
    return positions[:, 0]


@pytest.mark.parametrize("image_grid", [(1, 8, 12), (1, 12, 4)])  # wide and tall
@pytest.mark.parametrize("split", [None, 7, 30])  # unsplit; a prefill chunk ending inside the image / the video
def test_pruned_positions_equal_transformers_preserve(image_grid: tuple[int, int, int], split: int | None) -> None:
    """Before encoding (`prompt_positions`) and after `write_media_positions` with our columns, the kept tokens and
    all text have the positions transformers gives the unpruned prompt (policy "preserve"), also when a prefill
    chunk boundary splits an item (the runner then hands each chunk its rows of the item)."""
    from vlm_prune.integrations.vllm import testing as T

    video_grid, second_per_grid, tokens_per_second = (2, 4, 6), 1.0, 2
    items = [(T.IMAGE_PAD, image_grid), (T.VIDEO_PAD, video_grid)]
    generator = torch.Generator().manual_seed(3)
    full, pruned, masks = [40, 41], [40, 41], []
    for token, grid in items:
        t, h, w = grid[0], grid[1] // 2, grid[2] // 2
        n = t * h * w
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[: max(1, n // 3)]] = True
        masks.append(((t, h, w), mask))
        full += [T.VISION_START] + [token] * n + [T.VISION_END, 42, 43]
        pruned += [T.VISION_START] + [token] * int(mask.sum()) + [T.VISION_END, 42, 43]
    reference = _hf_positions(full, image_grid, video_grid, second_per_grid)
    # kept columns in prompt order: text, then each item's kept tokens at their place
    columns, cursor = [], 0
    for (token, _), (_grid, mask) in zip(items, masks):
        start = full.index(token)
        columns += list(range(cursor, start))
        columns += (start + mask.nonzero(as_tuple=True)[0]).tolist()
        cursor = start + mask.numel()
    columns += list(range(cursor, len(full)))
    ids = torch.tensor(pruned)
    factors = [1.0, second_per_grid * tokens_per_second]
    placements = [(pruned.index(token), int(mask.sum()), *grid_layout(grid, factor))
                  for (token, _), (grid, mask), factor in zip(items, masks, factors)]
    before, delta = prompt_positions(len(pruned), placements)
    text = ~(ids == T.IMAGE_PAD) & ~(ids == T.VIDEO_PAD)
    assert torch.equal(before[:, text], reference[:, columns][:, text])  # text already right before encoding
    rows = [torch.cat([torch.randn(int(mask.sum()), 8), media_columns(item_positions(grid, mask, f)[:, :3])], 1)
            for (grid, mask), f in zip(masks, factors)]
    chunks = [(0, len(pruned))] if split is None else [(0, split), (split, len(pruned))]
    after = before
    for begin, end in chunks:  # what the runner hands over per chunk: each item's rows inside [begin, end)
        sliced = []
        for (offset, length, *_), item_rows in zip(placements, rows):
            lo, hi = max(begin, offset), min(end, offset + length)
            if lo < hi:
                sliced.append(item_rows[lo - offset : hi - offset])
        stripped, after, new_delta = write_media_positions(ids, sliced, after, begin, (T.IMAGE_PAD, T.VIDEO_PAD))
        assert all(s.shape[1] == 8 for s in stripped)
    assert torch.equal(after, reference[:, columns])
    assert new_delta == delta == int(reference.max()) + 1 - len(pruned)  # decoding continues as unpruned


def test_media_columns_survive_bfloat16() -> None:
    """Positions and indices up to 2**21 - 1 ride exactly in bfloat16 rows (raw values would round above 256)."""
    values = torch.tensor([[0, 1, 255, 257, 4099], [300_001, 65_537, 1_000_003, 2**21 - 1, 7]])
    assert torch.equal(decode(encode(values, torch.bfloat16)), values)
    assert torch.bfloat16 != torch.float32 and float(torch.tensor(257.0).to(torch.bfloat16)) != 257.0


def test_qwen3_frames_layout_equals_vllms_unpruned_video_positions() -> None:
    """Our unpruned Qwen3-VL video layout (per frame: timestamp text, vision start, grid at t = 0, vision end) is
    what vLLM's own Qwen3-VL numbering gives the unpruned span; a lumped span (all tokens in frame 0) gets the same."""
    from types import SimpleNamespace

    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as Qwen3

    from vlm_prune.integrations.vllm import testing as T

    h, w, frames = 3, 4, 3
    timestamps = [[50, 51], [52], [53, 54, 55]]
    span = []
    for stamp in timestamps:
        span += stamp + [T.VISION_START] + [T.VIDEO_PAD] * (h * w) + [T.VISION_END]
    prompt = [40, 41, T.VISION_START] + span + [T.VISION_END, 42]
    feature = SimpleNamespace(
        mm_position=SimpleNamespace(offset=3, length=len(span)), modality="video",
        data={"video_grid_thw": SimpleNamespace(data=torch.tensor([frames, 2 * h, 2 * w]))},
    )
    config = SimpleNamespace(video_token_id=T.VIDEO_PAD, vision_start_token_id=T.VISION_START,
                             vision_end_token_id=T.VISION_END, vision_config=SimpleNamespace(spatial_merge_size=2))
    reference, _ = Qwen3._get_mrope_input_positions(prompt, [feature], config)
    local, extent = frames_layout(span, (h, w), T.VISION_START, T.VISION_END)
    assert torch.equal(local.T + 3, reference[:, 3 : 3 + len(span)])
    assert extent + 3 == int(reference[0, 3 + len(span)])  # the outer vision end continues from the extent
    lumped = []
    for f, stamp in enumerate(timestamps):
        lumped += stamp + [T.VISION_START] + [T.VIDEO_PAD] * (5 if f == 0 else 0) + [T.VISION_END]
    assert frames_layout(lumped, (h, w), T.VISION_START, T.VISION_END)[1] == extent


def test_spec_errors_say_what_to_pass() -> None:
    for raw, words in [
        ({"method": "fastv", "keep": 0.5}, "pre-LLM"),
        ({"method": "evs+divprune", "keep": 0.5}, "one pre-LLM"),
        ({"method": "random"}, "budget"),
        ({"method": "divprune", "keep": 0.5, "modalities": ["audio"]}, "modalities"),
        ({"method": "evs", "keep": 0.5, "modalities": ["image"]}, "video only"),
        ({"method": "divprune", "keep": 0.5, "bogus": 1}, "bogus"),
        ({"keep": 0.5}, "method"),
    ]:
        with pytest.raises(PruneError, match=words):
            parse_spec(raw)
    spec = parse_spec('{"method": "DivPrune", "keep": 64}')
    assert spec.method == "divprune" and spec.keep == 64 and spec.modalities == ("image", "video")
    assert parse_spec({"method": "divprune", "keep": 0.5}).cache_key() != spec.cache_key()


def test_version_check_names_the_supported_versions() -> None:
    compat.check_version("0.32.0+cpu")
    compat.check_version("0.33.1")
    with pytest.raises(compat.VllmVersionError, match="0.32"):
        compat.check_version("0.31.2")
    assert compat.load().version.startswith("0.32")


def test_register_is_idempotent_and_replaces_nothing() -> None:
    from vllm import ModelRegistry

    from vlm_prune.integrations.vllm import register
    from vlm_prune.integrations.vllm.runner import wants_pruning

    vllm = compat.load()
    own = ModelRegistry.models["Qwen2_5_VLForConditionalGeneration"]
    register()
    wrapped = vllm.CPUModelRunner.load_model
    register()
    assert vllm.CPUModelRunner.load_model is wrapped and not getattr(wrapped.__wrapped__, "_vlm_prune_wrapped", False)
    assert getattr(vllm.GPUModelRunner.load_model, "_vlm_prune_wrapped", False)
    assert "VlmPruneQwen2_5_VLForConditionalGeneration" in ModelRegistry.get_supported_archs()
    assert ModelRegistry.models["Qwen2_5_VLForConditionalGeneration"] is own  # vLLM's class untouched

    class Runner:  # a model that did not opt in, no --video-pruning-rate: the flag stays off
        class model_config:  # noqa: N801
            class multimodal_config:  # noqa: N801
                @staticmethod
                def is_multimodal_pruning_enabled() -> bool:
                    return False

    class Plain:
        supports_multimodal_pruning = True

    class Ours(Plain):
        vlm_prune_spec = parse_spec({"method": "divprune", "keep": 0.5})

    assert not wants_pruning(Runner(), Plain()) and wants_pruning(Runner(), Ours())


def test_random_runs_per_item_as_transformers_per_item() -> None:
    """The plugin's random (per_item=True, set by parse_spec) keeps, for every item of a two-item sample, what the
    transformers path's RandomPrune(per_item=True) keeps there; without per_item the second item differs."""
    from vlm_prune.engine.context import VisualLayout
    from vlm_prune.methods.random import RandomPrune

    spec = parse_spec({"method": "random", "keep": 0.5})
    assert dict(spec.options)["per_item"] is True
    with pytest.raises(PruneError, match="per_item"):
        parse_spec({"method": "random", "keep": 0.5, "per_item": False})
    grids = [(1, 4, 6), (2, 3, 4)]
    features = [torch.randn(t * h * w, 8, generator=torch.Generator().manual_seed(t)) for t, h, w in grids]
    ours = [select_item(f, g, "image", spec)[0] for f, g in zip(features, grids)]
    n = [f.shape[0] for f in features]
    coords = torch.cat([raster_grid(*g) for g in grids])
    layout = VisualLayout(media_index=torch.cat([torch.full((k,), i) for i, k in enumerate(n)]),
                          kind=torch.zeros(sum(n), dtype=torch.long), frame=coords[:, 0].clone(), grid_thw=coords,
                          media_grid=grids)
    from vlm_prune.integrations.vllm.select import item_context

    ctx = item_context(torch.cat(features), (1, 1, sum(n)), "image", None, 0)
    ctx.layout, ctx.budget_per_media = layout, [k // 2 for k in n]
    together = RandomPrune(keep=0.5, per_item=True).select(ctx)
    assert torch.equal(together, torch.cat(ours))
    sequential = RandomPrune(keep=0.5).select(ctx)
    assert torch.equal(sequential[: n[0]], ours[0]) and not torch.equal(sequential[n[0]:], ours[1])

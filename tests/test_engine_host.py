"""The engine's host-side fast paths (issue 15: host time per forward) against brute-force references.

* `SmallLRU`: hits, misses, eviction order.
* `HostBatch.stage_input` / `apply`: the no-padding, one-row and kept-everything shortcuts give what a per-row
  Python loop over the slots gives (random keep masks, ragged and equal kept counts, left padding).
* the LLaVA-NeXT anyres block (`_hires_block`) equals the token-by-token construction it replaced.
* `compact_reference(padded=False)` equals the default path when the index has no pad slot.
* `media_template`: the per-plan arrays against hand-built ones, and planned samples against a plain list.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm_prune
from tests.adapter_calls import recorded_sample_media_args
from vlm_prune.adapters.base import SampleMedia
from vlm_prune.adapters.llava import _grid_block, _hires_block
from vlm_prune.adapters.media_plan import PlannedSamples
from vlm_prune.engine.batch import SAME, HostBatch, _valid_runs, media_template
from vlm_prune.engine.context import IMAGE, VisualLayout
from vlm_prune.engine.lru import SmallLRU
from vlm_prune.engine.ragged import positions_within
from vlm_prune.kernels.reference import compact_reference, take_rows, trim_reference
from vlm_prune.toy_models import build_tiny


def test_small_lru_keeps_the_most_recent_entries():
    lru = SmallLRU(2)
    built = []

    def build(value):
        def make():
            built.append(value)
            return value

        return make

    assert lru.get("a", build(1)) == 1 and lru.get("b", build(2)) == 2
    assert lru.get("a", build(10)) == 1  # a hit: not rebuilt, and now the most recent
    lru.get("c", build(3))  # evicts "b", the least recently used
    assert "a" in lru and "c" in lru and "b" not in lru and len(lru) == 2
    assert built == [1, 2, 3] and (lru.hits, lru.misses) == (1, 3)
    with pytest.raises(ValueError):
        SmallLRU(0)


# ---------------------------------------------------------------- HostBatch against a per-row loop


def _samples(valid: torch.Tensor, generator: torch.Generator) -> list[SampleMedia]:
    """Per row: a random run of visual columns among the valid slots, in one or two media items."""
    samples = []
    for row in valid:
        slots = row.nonzero(as_tuple=True)[0]
        count = int(torch.randint(0, len(slots) + 1, (1,), generator=generator))
        start = int(torch.randint(0, len(slots) - count + 1, (1,), generator=generator))
        columns = slots[start : start + count]
        split = count // 2
        media = torch.cat([torch.zeros(split, dtype=torch.long), torch.ones(count - split, dtype=torch.long)])
        grids = [(1, 1, split), (1, 1, count - split)] if split else [(1, 1, count)] if count else []
        if not split:
            media = torch.zeros(count, dtype=torch.long)
        layout = VisualLayout(media, torch.full_like(media, IMAGE), torch.zeros_like(media),
                              torch.zeros(count, 3, dtype=torch.long), grids)
        samples.append(SampleMedia(columns, layout))
    return samples


def _expected_index(columns: torch.Tensor, removed_columns: list[set]) -> torch.Tensor:
    """(B, L') original column per new slot, rows left-padded with -1: the kept slots of each row, in order."""
    rows = [[int(c) for c in row if int(c) not in gone] for row, gone in zip(columns, removed_columns)]
    width = max(len(row) for row in rows)
    return torch.tensor([[-1] * (width - len(row)) + row for row in rows], dtype=torch.long)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("mode", ["random", "all", "equal"])
@pytest.mark.parametrize("slots_known", [False, True])
def test_host_batch_matches_a_per_row_loop(batch, padding, mode, slots_known):
    generator = torch.Generator().manual_seed(batch * 10 + padding + len(mode))
    length = 12
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padding:
        for row in range(batch):
            valid[row, : int(torch.randint(0, 4, (1,), generator=generator))] = False
    samples = _samples(valid, generator)
    # (`columns_are_slots`: the engine's prefill mirror, whose first compaction takes its columns from the index)
    host = HostBatch(torch.arange(length).expand(batch, -1), valid, samples, columns_are_slots=slots_known)
    removed: list[set] = [set() for _ in range(batch)]
    host.mark_segment()  # a segment starts before the stages: `within` must follow both compactions
    segment_columns = host.columns
    for _stage in range(2):
        plan = host.stage_input()
        # the plan against the samples: counts, starts, valid counts and padded slots / ranks, per row
        present = [[int(c) for c in s.visual_columns if int(c) not in removed[r]] for r, s in enumerate(samples)]
        assert plan.counts == [len(p) for p in present]
        assert plan.starts == [sum(len(p) for p in present[:r]) for r in range(batch)]
        assert plan.valid_counts == host.valid.sum(dim=1).tolist()
        runs: list[int] | None = []
        for row in range(batch):
            slot_of = {int(c): s for s, c in enumerate(host.columns[row].tolist()) if c >= 0}
            slots = [slot_of[c] for c in present[row]]
            ranks = [int(host.valid[row, :s].sum()) for s in slots]
            assert plan.padded[0, row, : len(slots)].tolist() == slots
            assert plan.padded[1, row, : len(slots)].tolist() == ranks
            assert plan.flat[plan.starts[row] : plan.starts[row] + len(slots)].tolist() == [
                row * host.columns.shape[1] + s for s in slots
            ]
            consecutive = slots == list(range(slots[0], slots[0] + len(slots))) if slots else True
            runs = None if runs is None or not consecutive else [*runs, slots[0] if slots else 0]
        assert plan.runs == runs  # the engine takes views of hidden for these rows
        total = sum(plan.counts)
        if mode == "all":
            keep = torch.ones(total, dtype=torch.bool)
        elif mode == "equal":  # the same number dropped in every row: no pad slot in the index
            keep = torch.ones(total, dtype=torch.bool)
            drop = min(plan.counts)
            for row in range(batch):
                keep[plan.starts[row] : plan.starts[row] + drop] = False
        else:
            keep = torch.rand(total, generator=generator) < 0.5
        for row in range(batch):
            mine = keep[plan.starts[row] : plan.starts[row] + plan.counts[row]]
            removed[row] |= {c for c, k in zip(present[row], mine.tolist()) if not k}
        before = host.columns.clone()
        index, gone, new_slot = host.apply(plan, keep)
        if index is not None:  # the rotary gather's index: pads at slot 0 when there are pads, else the index
            unread = host.gather_index(index)
            assert torch.equal(unread, index.clamp(min=0))
            assert (unread is index) == (not host.index_padded)
        if bool(keep.all()):  # kept everything: no index, nothing removed, the slots stay
            assert index is None and gone is None and torch.equal(host.columns, before)
            index, gone = torch.arange(before.shape[1]).expand(batch, -1), torch.zeros(before.shape, dtype=torch.bool)
        expected = _expected_index(before, removed) if mode != "all" else before
        real = index >= 0
        assert torch.equal(torch.where(real, before.gather(1, index.clamp(min=0)), -1), expected)
        assert torch.equal(host.columns, expected)
        assert host.index_padded == bool((index < 0).any())
        assert host.has_pad_slots == bool((host.columns < 0).any())  # followed on the host, never searched
        assert host.all_valid == bool(host.valid.all())
        assert gone.sum().item() == int((~keep).sum())
        # the new slot of every kept visual token holds its column
        kept_columns = [c for row in range(batch) for c in present[row] if c not in removed[row]]
        rows = [row for row in range(batch) for c in present[row] if c not in removed[row]]
        assert [int(host.columns[r, s]) for r, s in zip(rows, new_slot().tolist())] == kept_columns
        assert host.current_counts == host.media_counts(host.present)
        assert all(type(count) is int for row in host.current_counts for count in row)  # (they reach the stats)
    within = host.within[0]
    if within is SAME:  # no stage removed anything
        assert torch.equal(segment_columns, host.columns)
    else:  # the composed index equals the one found from the columns (what trimming would compute)
        assert torch.equal(within, positions_within(segment_columns, host.columns))
        # the cache trim's: the same with its pad slots at slot 0 (never read)
        assert torch.equal(host.within_unread[0], within.clamp(min=0))
    assert (within is SAME) == (mode == "all" or torch.equal(segment_columns, host.columns))


def test_hires_block_equals_the_token_loop():
    base = _grid_block(1, 3, 3)
    for rows, width in [(1, 1), (2, 5), (4, 3)]:
        expected = []
        for row in range(rows):
            expected += [[1, row, col] for col in range(width)] + [[-1, -1, -1]]
        block = _hires_block(rows, width, base)
        assert torch.equal(block[: len(base)], base)
        assert block[len(base) :].tolist() == expected


def test_compact_without_pads_equals_the_default_path():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 4, generator=generator)
    index = torch.stack([torch.randperm(7, generator=generator)[:5].sort().values for _ in range(3)])
    columns, mask = torch.arange(7).expand(3, -1), torch.ones(3, 9, dtype=torch.long)
    rope = torch.arange(21).view(3, 7).unsqueeze(0).expand(3, -1, -1)
    fast = compact_reference(hidden, index, columns, mask, rope, padded=False)
    default = compact_reference(hidden, index, columns, mask, rope)
    for a, b in zip(fast, default):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("contiguous", [True, False])
def test_take_rows_and_trim_equal_the_broadcast_gather(batch, contiguous):
    generator = torch.Generator().manual_seed(batch + 2 * contiguous)
    index = torch.stack([torch.randperm(9, generator=generator)[:4].sort().values for _ in range(batch)])
    hidden = torch.randn(batch, 9, 5, generator=generator)
    cache = torch.randn(batch, 2, 9, 3, generator=generator)
    if not contiguous:
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
        cache = cache.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(take_rows(hidden, 1, index), torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, 5)))
    expected = torch.gather(cache, 2, index.view(batch, 1, 4, 1).expand(-1, 2, -1, 3))
    assert torch.equal(take_rows(cache, 2, index), expected)
    padded = index.clone()
    padded[0, 0] = -1  # a pad slot: filled
    trimmed = trim_reference([cache, cache * 2], padded, fill=7)
    safe = padded.clamp(min=0).view(batch, 1, 4, 1).expand(-1, 2, -1, 3)
    for tensor, out in zip([cache, cache * 2], trimmed):
        want = torch.gather(tensor, 2, safe).masked_fill((padded < 0).view(batch, 1, 4, 1), 7)
        assert torch.equal(out, want) and out.is_contiguous()


# ---------------------------------------------------------------- adapters' cached layouts vs a fresh adapter


def _same_media(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.visual_columns, b.visual_columns)
        for name in ("media_index", "kind", "frame", "grid_thw"):
            assert torch.equal(getattr(a.layout, name), getattr(b.layout, name)), name
        assert list(a.layout.media_grid) == list(b.layout.media_grid)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl"])
def test_cached_sample_media_equals_a_fresh_adapter(family):
    """The adapters' numpy column search and layout caches (keyed by the items' blocks) give what an adapter with
    empty caches gives, while the inputs change between calls (other rows, images, videos, order, padding)."""
    from vlm_prune.toy_models import VIDEO_FAMILIES, build_tiny, make_inputs

    model = build_tiny(family)
    video = family in VIDEO_FAMILIES
    variants = [dict(batch=2), dict(batch=3, num_images=[1, 0, 2]), dict(batch=1), dict(batch=2, padding="right")]
    if video:
        variants += [dict(batch=2, video=True), dict(batch=2, video=True, video_first=True, num_images=[0, 1])]
    calls = []
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        adapter = handle.adapter
        cached = adapter.sample_media

        def checked(input_ids, call, embeds):
            got = cached(input_ids, call, embeds)
            _same_media(got, type(adapter)(model).sample_media(input_ids, call, embeds))  # empty caches
            calls.append(len(got))
            return got

        adapter.sample_media = checked
        for variant in variants + variants[:2]:  # the first signatures seen again after the others (cache hits)
            model(**make_inputs(model, **variant))
    assert len(calls) == len(variants) + 2


def test_llava_next_padded_block_matches_hand_built_and_is_one_cached_object():
    """An anyres image of a model without `image_newline`: base grid, then grid-less (-1) tokens; the same object
    each call, so the id-keyed layout caches hit."""
    from vlm_prune.adapters.llava import _grid_block, _padded_block

    base = _grid_block(1, 2, 2)  # a CLS-like grid-less token, then a 2x2 grid
    block = _padded_block(3, base)
    expected = torch.tensor([[-1, -1, -1], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]] + [[-1, -1, -1]] * 3)
    assert torch.equal(block, expected)
    assert _padded_block(3, base) is block


# ---------------------------------------------------------------- the media template (per-plan host arrays)


def test_media_template_matches_hand_built_arrays():
    generator = torch.Generator().manual_seed(3)
    valid = torch.ones(3, 10, dtype=torch.bool)
    samples = _samples(valid, generator)
    template, columns = media_template(samples)
    counts = [len(s.visual_columns) for s in samples]
    num_media = [s.layout.num_media for s in samples]
    width = max(num_media + [1])
    assert template.num_media == num_media and template.width == width
    assert template.rows.tolist() == [row for row, n in enumerate(counts) for _ in range(n)]
    assert template.offsets == [sum(counts[:r]) for r in range(len(counts) + 1)]
    assert columns.tolist() == [int(c) for s in samples for c in s.visual_columns]
    keys = [row * width + int(m) for row, s in enumerate(samples) for m in s.layout.media_index]
    assert template.media_key.tolist() == keys
    assert template.original_counts == [
        [int((s.layout.media_index == item).sum()) for item in range(s.layout.num_media)] for s in samples
    ]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_planned_samples_give_the_host_mirror_of_a_plain_list(family):
    """An adapter's planned samples (plan + flat columns) build the same mirror as the same samples as a plain
    list, and a second call of the signature reuses the template, untouched by the first call's stages."""
    model = build_tiny(family)
    adapter, args = recorded_sample_media_args(model, batch=3)
    planned = adapter.sample_media(*args)
    assert isinstance(planned, PlannedSamples)
    length = args[0].shape[1]
    columns = torch.arange(length).expand(3, -1)
    valid = torch.ones(3, length, dtype=torch.bool)
    fast, plain = HostBatch(columns, valid, planned), HostBatch(columns, valid, list(planned))
    for name in ("rows", "media_key", "kind", "columns0", "slot"):
        assert getattr(fast, name).tolist() == getattr(plain, name).tolist(), name
    assert (fast.offsets, fast.original_counts, fast.num_media) == (plain.offsets, plain.original_counts,
                                                                     plain.num_media)
    keep = torch.rand(len(fast.rows), generator=torch.Generator().manual_seed(0)) < 0.5
    results = [host.apply(host.stage_input(), keep) for host in (fast, plain)]
    results = [(index, gone, new_slot()) for index, gone, new_slot in results]  # (new slots: made on request)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(*results))
    before = fast.original_counts
    again = adapter.sample_media(*args)
    template, _ = media_template(again)
    assert template.original_counts is before and template.rows.tolist() == plain.rows.tolist()


@pytest.mark.parametrize("rows", [1, 3])
def test_shared_aranges_are_the_adapters_positions_as_views_of_one_buffer(rows):
    from vlm_prune.adapters.base import Adapter
    from vlm_prune.engine.aranges import SharedAranges
    from vlm_prune.engine.calls import rope_view

    batch, length, cpu = 2, 5, torch.device("cpu")
    aranges = SharedAranges()
    expected = Adapter.rope_positions(type("A", (), {"rope_rows": rows})(), None, batch, length, 0)
    rope, again = aranges.rope(length, batch, rows, cpu), aranges.rope(length + 2, batch, rows, cpu)
    assert torch.equal(rope, expected) and rope.data_ptr() == again.data_ptr()  # one buffer, no copy per call
    positions = aranges.positions(3, length, batch, cpu)
    assert torch.equal(positions, torch.arange(3, 3 + length).expand(batch, -1))
    long = aranges.positions(0, 10_000, batch, cpu)  # past the first buffer: a longer one, the same values
    assert torch.equal(long[:, -1], torch.full((batch,), 9_999)) and long.shape == (batch, 10_000)
    assert rope_view(None, rows, cpu) is None  # no ids: the caller decides (the engine takes `SharedAranges.rope`)
    ids = torch.arange(length).expand(batch, -1)
    assert torch.equal(rope_view(ids, rows, cpu), expected)


def test_a_decode_forward_state_equals_the_dataclass_built_one():
    """`_Forward.decode` skips the dataclass __init__ per step: every field must still be there, at its default."""
    from vlm_prune.engine.forward_state import _Forward

    columns, mask, rope = torch.zeros(2, 1), torch.ones(2, 5), torch.zeros(1, 2, 1)
    fast, built = _Forward.decode(columns, mask, rope), _Forward(prefill=False, columns=columns, mask=mask, rope=rope)
    assert fast == built
    assert fast.layer_masks is not _Forward.decode(columns, mask, rope).layer_masks  # fresh containers per step
    shift = torch.zeros(2, dtype=torch.long)
    prefill = _Forward.start_prefill(columns=columns, mask=mask, rope=rope, shift=shift)
    assert prefill == _Forward(prefill=True, columns=columns, mask=mask, rope=rope, shift=shift)
    assert prefill.samples is not _Forward.start_prefill(columns=columns, mask=mask, rope=rope).samples
    from vlm_prune.engine.forward_state import _FORWARD_FACTORIES

    # `_fresh` writes one literal per field with a factory: a new such field must be added there too
    assert set(_FORWARD_FACTORIES) == {"samples", "host_segments", "segments", "layer_masks", "reentry"}
    for name, factory in _FORWARD_FACTORIES.items():
        assert type(getattr(fast, name)) is type(factory()) and getattr(fast, name) == factory(), name


def test_read_call_reads_the_integer_and_bool_entries_only():
    """`read_call` takes every integer or bool tensor of the call (what the adapters read on the host), whatever its
    dtype, and no floating or complex one: the same as the tensors' own `is_floating_point` / `is_complex`."""
    from vlm_prune.engine.batch import _readable

    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
              torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
    for dtype in dtypes:
        tensor = torch.zeros(2, dtype=dtype)
        assert _readable(tensor) == (not tensor.is_floating_point() and not tensor.is_complex()), dtype
    assert not _readable([1, 2]) and not _readable(None)


def test_first_stage_budgets_are_computed_once_per_template_and_keep():
    """Before any stage removed a token, the budgets are a function of the template and the keep: a second mirror
    of the same plan gets the same lists; another keep, or a later stage, computes its own (tokens_to_keep)."""
    from vlm_prune.engine.budget import tokens_to_keep

    model = build_tiny("llava_next")
    adapter, args = recorded_sample_media_args(model, batch=3)
    length = args[0].shape[1]
    columns, valid = torch.arange(length).expand(3, -1), torch.ones(3, length, dtype=torch.bool)
    first = HostBatch(columns, valid, adapter.sample_media(*args))
    again = HostBatch(columns, valid, adapter.sample_media(*args))
    budgets = first.budgets(0.3, first.original_counts)
    assert budgets == [[tokens_to_keep(0.3, n, n) for n in row] for row in first.original_counts]
    assert again.budgets(0.3, again.original_counts) is budgets  # the same plan: computed once
    assert again.budgets(5, again.original_counts) == [[min(5, n) for n in row] for row in again.original_counts]
    assert again.budgets(0.3, again.original_counts) is budgets  # (an int keep has its own entry)
    later = [[max(1, n // 2) for n in row] for row in first.original_counts]  # tokens left after a first stage
    assert first.budgets(0.3, later) == [
        [tokens_to_keep(0.3, n, c) for n, c in zip(row, now)] for row, now in zip(first.original_counts, later)
    ]


@pytest.mark.parametrize("padding", [False, True])
def test_a_plans_padded_index_is_made_on_first_read_and_survives_the_stage(padding):
    """`StageInput.padded` is made on first read (most stages never read it); read after the stage advanced the
    mirror (a method that kept its context), it still describes the stage's input: apply writes a new slot array."""
    generator = torch.Generator().manual_seed(3)
    valid = torch.ones(3, 12, dtype=torch.bool)
    if padding:
        valid[0, :2] = valid[2, :1] = False
    samples = _samples(valid, generator)
    early, late = (HostBatch(torch.arange(12).expand(3, -1), valid, samples) for _ in range(2))
    plans = [host.stage_input() for host in (early, late)]
    assert plans[0]._padded is None  # nothing read it yet
    before = plans[0].padded.clone()
    keep = torch.rand(sum(plans[0].counts), generator=generator) < 0.5
    for host, plan in zip((early, late), plans):
        host.apply(plan, keep)
    assert torch.equal(plans[1].padded, before)  # read after the stage: the same
    assert torch.equal(plans[0].padded, before)


@pytest.mark.parametrize("seed", range(6))
def test_valid_runs_equal_the_reductions_over_the_rows(seed):
    """`_valid_runs` (nonzero + divmod + bincount) against the axis reductions it replaces, on masks with left and
    right padding, holes and empty rows."""
    generator = np.random.default_rng(seed)
    batch, length = int(generator.integers(1, 6)), int(generator.integers(1, 9))
    valid = generator.random((batch, length)) < 0.6
    valid[0] = True
    if batch > 1:
        valid[-1] = False  # a row without a valid slot
    counts, firsts = _valid_runs(valid)
    expected_counts = valid.sum(axis=1)
    assert counts == expected_counts.tolist()
    assert firsts == np.where(expected_counts > 0, valid.argmax(axis=1), length).tolist()


def test_records_made_without_init_equal_the_dataclass_built_ones():
    """`engine/records.fresh` skips a dataclass __init__ in the hot path: each record the engine makes that way must
    hold every field (a field added to the class but not to the caller's dict fails here) at the value __init__
    would give it."""
    import dataclasses

    from vlm_prune.engine.batch import StageInput
    from vlm_prune.engine.cached import CachedPrefill
    from vlm_prune.engine.records import defaults, factories, fresh
    from vlm_prune.engine.stats import PruneStats

    stats = PruneStats.of_prefill(7)
    assert stats == PruneStats(visual_tokens_in=7) and stats.stages is not PruneStats.of_prefill(7).stages
    assert factories(PruneStats) == {"stages"} and set(defaults(PruneStats)) | {"stages"} == set(vars(stats))
    columns = torch.tensor([[0, 1, 3]])
    state = CachedPrefill.after_prefill([(0, columns)], columns, (columns, True, False),
                                        (torch.ones(1, 3, dtype=torch.long), True, None), 4, np.zeros(1, np.int64),
                                        torch.tensor([[5, 6, 7, 8]]), None)  # fmt: skip
    built = CachedPrefill(original_length=4, shift=state.shift, segments=state.segments,
                          prefill_mask=state.prefill_mask, tokens=state.tokens, prefill_all_valid=[True],
                          prefill_pads=[False])  # fmt: skip
    assert set(vars(state)) == {f.name for f in dataclasses.fields(CachedPrefill)}
    for field in dataclasses.fields(CachedPrefill):
        assert getattr(state, field.name) is getattr(built, field.name) or getattr(state, field.name) == getattr(
            built, field.name), field.name
    valid = torch.ones(1, 6, dtype=torch.bool)
    host = HostBatch(torch.arange(6).expand(1, -1), valid, _samples(valid, torch.Generator().manual_seed(0)))
    plan = host.stage_input()
    assert set(vars(plan)) == {f.name for f in dataclasses.fields(StageInput)} and plan._padded is None
    assert fresh(StageInput, dict(vars(plan))) == StageInput(**vars(plan))

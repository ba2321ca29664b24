"""The adapters' fast `sample_media` (batch plans on ranks, bytes newline search, numpy counts) against the
per-row implementation it replaced, kept here as the reference (`_reference_*`: the same logic and messages, row
by row on the real columns, every layout built afresh, no cache).

Every field of every sample is compared, over varied batches (padding side, rows without media, several images,
videos before or after the images, generate()'s pre-encoded media), over hand-built interleaved items, and for
bad inputs the same InputError message.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vlm_prune
from tests.adapter_calls import recorded_sample_media_args
from vlm_prune.adapters import LlavaAdapter
from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, SampleMedia, item_counts
from vlm_prune.adapters.llava import (
    LlavaNextAdapter,
    _grid_block,
    _hires_block,
    _layout_from_blocks,
    _newline_flags,
    _padded_block,
)
from vlm_prune.adapters.llava_video import LlavaNextVideoAdapter, _image_grid, _row_runs, _video_block
from vlm_prune.adapters.qwen_vl import QwenVLAdapter, _layout_of, item_grid
from vlm_prune.engine.context import IMAGE, VIDEO, Selection, VisualLayout
from vlm_prune.engine.syncs import on_device
from vlm_prune.errors import InputError
from vlm_prune.methods.base import Method
from vlm_prune.toy_models import QWEN_FAMILIES, VIDEO_FAMILIES, build_tiny, make_inputs

FAMILIES = ("llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen3_vl")


# ---- the reference: the per-row implementation -------------------------------------------------------------
def _reference_llava(adapter, input_ids, call, embeds, image_blocks) -> list[SampleMedia]:
    is_visual = input_ids.cpu().numpy() == adapter.image_token_id
    per_row = is_visual.sum(axis=1).tolist()
    if not any(per_row):
        return [SampleMedia(torch.zeros(0, dtype=torch.long), _layout_from_blocks([])) for _ in input_ids]
    blocks = image_blocks(adapter, input_ids, call, embeds)
    sizes = [len(block) for block in blocks]
    flat = torch.from_numpy(np.flatnonzero(is_visual) % is_visual.shape[1])
    row_columns = flat.split(per_row) if len(per_row) > 1 else (flat,)
    samples, next_block = [], 0
    for columns, total in zip(row_columns, per_row):
        first, count = next_block, 0
        while count < total:
            if next_block >= len(blocks):
                raise InputError(f"more image tokens than images; check the processor output. {SPLIT_MEDIA_HINT}")
            count += sizes[next_block]
            next_block += 1
        if count != total:
            raise InputError(f"image tokens of a sample do not match whole images. {SPLIT_MEDIA_HINT}")
        samples.append(SampleMedia(columns, _layout_from_blocks(blocks[first:next_block])))
    return samples


def _reference_llava_blocks(adapter, input_ids, call, embeds):
    return type(adapter).image_blocks(adapter, input_ids, call, embeds)


def _reference_next_blocks(adapter, input_ids, call, inputs_embeds) -> list[torch.Tensor]:
    side, base_count = adapter._grid_side(), adapter._tokens_per_image()
    is_image = input_ids == adapter.image_token_id
    total = int(is_image.sum())
    newline = getattr(adapter.model.model, "image_newline", None)
    all_newline = None
    if newline is not None:
        all_newline = (inputs_embeds == newline.to(inputs_embeds.dtype)).all(dim=-1)[is_image].cpu().numpy()
    counts = item_counts(call, "image")
    if counts is None:
        counts = adapter._counts_from_sizes(call)
    with_images = [total for total in (input_ids == adapter.image_token_id).sum(dim=1).tolist() if total]
    if len(counts) == 1 and len(with_images) > 1 and counts[0] == sum(with_images):
        counts = with_images
    counts = adapter._split_image_runs(counts, all_newline)
    if sum(counts) != total:
        raise InputError(
            f"LLaVA-NeXT: {total} image tokens but the images need {sum(counts)}; "
            f"pass the processor's input_ids, pixel_values and image_sizes unchanged. {SPLIT_MEDIA_HINT}"
        )
    base = _grid_block(base_count - side * side, side, side, t=0)
    blocks, start = [], 0
    for count in counts:
        rest_start, start = start + base_count, start + count
        if count <= base_count:
            blocks.append(base)
            continue
        if all_newline is None:
            blocks.append(_padded_block(count - base_count, base))
            continue
        is_newline = all_newline[rest_start:start]
        row_ends = np.flatnonzero(is_newline)
        widths = np.diff(row_ends, prepend=-1) - 1
        if not bool(is_newline[-1]) or bool((widths != widths[0]).any()):
            raise InputError(
                "LLaVA-NeXT: an image's high-resolution rows are not one grid; the image tokens hold "
                f"more than one image or a part of one. {SPLIT_MEDIA_HINT}"
            )
        blocks.append(_hires_block(len(row_ends), int(widths[0]), base))
    return blocks


def _reference_runs(columns: torch.Tensor) -> list[int]:
    if len(columns) == 0:
        return []
    breaks = (torch.diff(columns) != 1).nonzero(as_tuple=True)[0] + 1
    edges = [0, *breaks.tolist(), len(columns)]
    return [end - start for start, end in zip(edges[:-1], edges[1:])]


def _reference_video_grids(adapter, input_ids, call) -> list[tuple[int, int, int]]:
    rows, cols = adapter.frame_grid()
    per_frame, extra = rows * cols, adapter.video_trailing_tokens
    placeholders = (input_ids == adapter.video_token_id).sum(dim=1).tolist()
    counts = item_counts(call, "video")
    if counts is None:
        pixel_values = call.get("pixel_values_videos")
        videos, frames = int(pixel_values.shape[0]), int(pixel_values.shape[1])
        counts = [frames * per_frame + extra] * videos
    elif len(counts) == 1 and counts[0] == sum(placeholders):
        counts = [run for row in input_ids for run in _reference_runs((row == adapter.video_token_id).nonzero()[:, 0])]
    assert sum(counts) == sum(placeholders), "the reference is only run on inputs whose counts agree"
    return [((count - extra) // per_frame, rows, cols) for count in counts]


def _reference_merge(pieces: list[tuple]) -> tuple[torch.Tensor, VisualLayout]:
    if not pieces:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, VisualLayout(empty, empty.clone(), empty.clone(), torch.zeros(0, 3, dtype=torch.long), [])
    pieces = sorted(pieces, key=lambda piece: piece[0])
    columns = torch.from_numpy(np.concatenate([piece[2] for piece in pieces]))
    grid_thw = torch.cat([piece[3] for piece in pieces])
    media_index = torch.cat([torch.full((len(piece[2]),), i, dtype=torch.long) for i, piece in enumerate(pieces)])
    kind = torch.cat([torch.full((len(piece[2]),), piece[1], dtype=torch.long) for piece in pieces])
    frame = torch.where(kind == VIDEO, grid_thw[:, 0], torch.zeros_like(kind))
    return columns, VisualLayout(media_index, kind, frame, grid_thw, [piece[4] for piece in pieces])


def _reference_video(adapter, input_ids, call, embeds) -> list[SampleMedia]:
    ids = input_ids.cpu().numpy()
    is_image, is_video = ids == adapter.image_token_id, ids == adapter.video_token_id
    image_blocks = _reference_next_blocks(adapter, input_ids, call, embeds) if is_image.any() else []
    video_grids = _reference_video_grids(adapter, input_ids, call) if is_video.any() else []
    next_image = next_video = 0
    samples = []
    for image_row, video_row in zip(is_image, is_video):
        pieces = []
        columns = np.flatnonzero(image_row)
        start = 0
        while start < len(columns):
            if next_image >= len(image_blocks):
                raise InputError(f"more image tokens than images; check the processor output. {SPLIT_MEDIA_HINT}")
            block = image_blocks[next_image]
            next_image += 1
            item = columns[start : start + len(block)]
            if len(item) != len(block):
                raise InputError(f"image tokens of a sample do not match whole images. {SPLIT_MEDIA_HINT}")
            pieces.append((int(item[0]), IMAGE, item, block, _image_grid(block)))
            start += len(block)
        columns = np.flatnonzero(video_row)
        start = 0
        while start < len(columns):
            if next_video >= len(video_grids):
                raise InputError(f"more video tokens than videos; check the processor output. {SPLIT_MEDIA_HINT}")
            frames, rows, cols = video_grids[next_video]
            next_video += 1
            count = frames * rows * cols
            item = columns[start : start + count + adapter.video_trailing_tokens]
            if len(item) != count + adapter.video_trailing_tokens:
                raise InputError(f"video tokens of a sample do not match whole videos. {SPLIT_MEDIA_HINT}")
            grid = (frames, rows, cols)
            pieces.append((int(item[0]), VIDEO, item[:count], _video_block(*grid), grid))
            start += len(item)
        samples.append(SampleMedia(*_reference_merge(pieces)))
    if next_image != len(image_blocks) or next_video != len(video_grids):
        raise InputError(
            f"{adapter.family}: the call brings {len(image_blocks)} images and {len(video_grids)} videos but the "
            f"placeholders hold {next_image} and {next_video}; pass the processor's input_ids with the media "
            f"it was built for. {SPLIT_MEDIA_HINT}"
        )
    return samples


def _reference_qwen(adapter, input_ids, call, embeds) -> list[SampleMedia]:
    queues = {
        IMAGE: (adapter.image_token_id, adapter._items(adapter._call_grids(call, "image"))),
        VIDEO: (adapter.video_token_id, adapter._items(adapter._call_grids(call, "video"))),
    }
    next_item = {IMAGE: 0, VIDEO: 0}
    samples = []
    for row in input_ids:
        pieces = []
        for kind, (token_id, grids) in queues.items():
            columns = (row == token_id).nonzero(as_tuple=True)[0]
            start = 0
            while start < len(columns):
                name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                if next_item[kind] >= len(grids):
                    raise InputError(
                        f"more media tokens than items in {name}; pass the processor output. {SPLIT_MEDIA_HINT}"
                    )
                t, h, w = grids[next_item[kind]]
                next_item[kind] += 1
                count = t * h * w
                item_columns = columns[start : start + count]
                if len(item_columns) != count:
                    raise InputError(
                        f"a media item of grid {(t, h, w)} (merged) needs {count} tokens, but its sample holds "
                        f"{len(item_columns)} more; the {name} does not match the placeholders. Pass the "
                        f"processor's input_ids with the {name} it returned. {SPLIT_MEDIA_HINT}"
                    )
                pieces.append((int(item_columns[0]), kind, item_columns, item_grid(t, h, w), (t, h, w)))
                start += count
        pieces.sort(key=lambda piece: piece[0])
        if not pieces:
            empty = torch.zeros(0, dtype=torch.long)
            samples.append(SampleMedia(empty, VisualLayout(empty, empty, empty, torch.zeros(0, 3).long(), [])))
            continue
        if all(int(a[2][-1]) < b[0] for a, b in zip(pieces, pieces[1:])):
            key = tuple((p[1], *p[4]) for p in pieces)
            samples.append(SampleMedia(torch.cat([p[2] for p in pieces]), _layout_of(key)))
            continue
        columns = torch.cat([p[2] for p in pieces])
        grid = torch.cat([p[3] for p in pieces])
        media_index = torch.cat([torch.full((len(p[2]),), i, dtype=torch.long) for i, p in enumerate(pieces)])
        kind = torch.cat([torch.full((len(p[2]),), p[1], dtype=torch.long) for p in pieces])
        order = torch.argsort(columns)
        layout = VisualLayout(
            media_index[order], kind[order], grid[order, 0].clone(), grid[order], [p[4] for p in pieces]
        )
        samples.append(SampleMedia(columns[order], layout))
    for kind, (_, grids) in queues.items():
        if next_item[kind] != len(grids):
            name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
            raise InputError(
                f"{name} holds {len(grids)} items but the placeholders hold only {next_item[kind]}; the grid "
                f"does not match the placeholders. Pass the processor's input_ids with the {name} it returned. "
                f"{SPLIT_MEDIA_HINT}"
            )
    return samples


def reference_sample_media(adapter, input_ids, call, embeds) -> list[SampleMedia]:
    if isinstance(adapter, QwenVLAdapter):
        return _reference_qwen(adapter, input_ids, call, embeds)
    if isinstance(adapter, LlavaNextVideoAdapter):
        return _reference_video(adapter, input_ids, call, embeds)
    blocks = _reference_next_blocks if isinstance(adapter, LlavaNextAdapter) else _reference_llava_blocks
    return _reference_llava(adapter, input_ids, call, embeds, blocks)


# ---- comparisons ------------------------------------------------------------------------------------------
LAYOUT_FIELDS = ("media_index", "kind", "frame", "grid_thw", "group", "voxel", "xyz")


def assert_same_samples(got: list[SampleMedia], want: list[SampleMedia]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.visual_columns.dtype == b.visual_columns.dtype == torch.long
        assert torch.equal(a.visual_columns, b.visual_columns)
        for name in LAYOUT_FIELDS:
            x, y = getattr(a.layout, name), getattr(b.layout, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), name
        assert list(a.layout.media_grid) == list(b.layout.media_grid)


def _compare_in_engine(model, runs: list) -> int:
    """Run each (inputs, generate?) through the engine; every sample_media call checked against the reference,
    and against a second call of the fast path (a plan-cache hit)."""
    calls = []
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        adapter = handle.adapter
        fast = adapter.sample_media

        def checked(input_ids, call, embeds):
            got = fast(input_ids, call, embeds)
            assert_same_samples(got, reference_sample_media(adapter, input_ids, call, embeds))
            again = fast(input_ids, call, embeds)
            assert_same_samples(again, got)
            calls.append(len(got))
            return got

        adapter.sample_media = checked
        for inputs, generate in runs:
            if generate:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            else:
                model(**inputs)
        assert len(adapter._plans) <= 32  # bounded
    return len(calls)


def _variants(family: str) -> list[dict]:
    variants = [
        dict(batch=1),
        dict(batch=8),
        dict(batch=3, num_images=[1, 0, 2]),
        dict(batch=4, padding="right", num_images=[2, 1, 0, 3]),
        dict(batch=2, num_images=0),
        dict(batch=3, prompt_lengths=[5, 30, 12]),
    ]
    if family in VIDEO_FAMILIES:
        variants += [
            dict(batch=2, video=True),
            dict(batch=3, video=True, video_first=True, num_images=[0, 1, 2]),
            dict(batch=2, video=True, num_images=0, padding="right"),
            dict(batch=1, video=True, num_images=0),
        ]
    if family in QWEN_FAMILIES:
        variants += [dict(batch=2, image_grid=(4, 6)), dict(batch=2, video=True, video_grid=(2, 4, 4))]
    return variants


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_sample_media_equals_the_reference_in_forward_and_generate(family):
    model = build_tiny(family)
    variants = _variants(family)
    runs = [(make_inputs(model, **v), False) for v in variants]
    runs += [(make_inputs(model, **v), True) for v in variants[:4] + variants[6:8]]
    runs += runs[:3]  # signatures seen before, after others (plan-cache hits across calls)
    media_ids = torch.tensor([3, 4])  # the toy image and video ids; text-only calls skip sample_media
    with_media = sum(bool(torch.isin(inputs["input_ids"], media_ids).any()) for inputs, _ in runs)
    assert _compare_in_engine(model, runs) >= with_media


# ---- hand-built calls: interleaved items, bad inputs ------------------------------------------------------
def _encoded(counts: list[int]) -> SimpleNamespace:
    return SimpleNamespace(pooler_output=[torch.zeros(count, 1) for count in counts])


def _both(adapter, input_ids, call, embeds):
    """(fast, reference) results, or their InputError messages."""
    out = []
    for fn in (type(adapter)(adapter.model).sample_media, lambda *a: reference_sample_media(adapter, *a)):
        try:
            out.append(fn(input_ids, call, embeds))
        except InputError as error:
            out.append(str(error))
    return out


def test_qwen_interleaved_and_bad_items_match_the_reference():
    model = build_tiny("qwen2_vl")
    adapter = QwenVLAdapter(model)
    img, vid = adapter.image_token_id, adapter.video_token_id
    merge = adapter.merge
    grids = {
        "image_grid_thw": torch.tensor([[1, 2 * merge, merge]]),
        "video_grid_thw": torch.tensor([[1, merge, 2 * merge]]),
    }
    rows = [
        [9, img, img, vid, vid, 9, 9],  # sorted items
        [vid, img, vid, img, 9, 9, 9],  # interleaved: argsort path
        [9, 9, 9, 9, 9, 9, 9],
    ]
    for row in rows:
        ids = torch.tensor([row])
        media = {
            k: v
            for k, v in grids.items()
            if (k.startswith("image") and img in row) or (k.startswith("video") and vid in row)
        }
        fast, ref = _both(adapter, ids, {"input_ids": ids, **media}, None)
        assert_same_samples(fast, ref)
    # interleaved rows in a batch, with a text-only row between (one plan, hit on the second call)
    ids = torch.tensor([rows[1], rows[2], rows[0]])
    call = {
        "input_ids": ids,
        "image_grid_thw": grids["image_grid_thw"].repeat(2, 1),
        "video_grid_thw": grids["video_grid_thw"].repeat(2, 1),
    }
    fast, ref = _both(adapter, ids, call, None)
    assert_same_samples(fast, ref)
    bad = [
        {"input_ids": ids, "image_grid_thw": call["image_grid_thw"][:1], "video_grid_thw": call["video_grid_thw"]},
        {
            "input_ids": ids,
            "image_grid_thw": call["image_grid_thw"].repeat(2, 1),
            "video_grid_thw": call["video_grid_thw"],
        },
        {
            "input_ids": ids,
            "image_grid_thw": torch.tensor([[1, 2 * merge, 2 * merge]] * 2),
            "video_grid_thw": call["video_grid_thw"],
        },
    ]
    for call in bad:
        fast, ref = _both(adapter, ids, call, None)
        assert isinstance(fast, str) and fast == ref


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_video_interleaved_and_bad_items_match_the_reference(family):
    model = build_tiny(family)
    with vlm_prune.pruned(model, "random", keep=0.5) as handle:
        adapter = handle.adapter
    img, vid = adapter.image_token_id, adapter.video_token_id
    base = adapter._tokens_per_image()
    rows, cols = adapter.frame_grid()
    video = rows * cols + adapter.video_trailing_tokens  # one frame
    dim = model.config.text_config.hidden_size
    # an image of its base grid only (no newline needed) with a video inside its span, a video before an image
    first = [9] * 3 + [img] * (base // 2) + [vid] * video + [img] * (base - base // 2) + [9]
    second = [9] * 2 + [vid] * video + [img] * base + [9] * (len(first) - 2 - video - base)
    text = [9] * len(first)
    for batch in ([first], [second, text, first]):
        ids = torch.tensor(batch)
        images = sum(row.count(img) for row in batch) // base
        videos = sum(row.count(vid) for row in batch) // video
        call = {
            "input_ids": ids,
            "mm_encoder_outputs": {"image": _encoded([base] * images), "video": _encoded([video] * videos)},
        }
        embeds = torch.randn(*ids.shape, dim)
        fast, ref = _both(adapter, ids, call, embeds)
        assert_same_samples(fast, ref)
        bad = copy.copy(call)
        bad["mm_encoder_outputs"] = {"image": _encoded([base] * (images + 1)), "video": _encoded([video] * videos)}
        fast, ref = _both(adapter, ids, bad, embeds)
        assert isinstance(fast, str) and fast == ref


def test_llava_rows_that_are_not_whole_images_raise_as_the_reference():
    adapter = LlavaAdapter(build_tiny("llava"))
    n, img = adapter._tokens_per_image(), adapter.image_token_id
    cases = [([n + 1, n - 1], [n, n]), ([n, n], [n]), ([n, 0, 2 * n], [n, n, n]), ([n, 0, n], [n, n])]
    for per_row, counts in cases:
        width = max(per_row) + 2
        ids = torch.tensor([[9] * (width - total) + [img] * total for total in per_row])
        call = {"input_ids": ids, "mm_encoder_outputs": {"image": _encoded(counts)}}
        fast, ref = _both(adapter, ids, call, None)
        if isinstance(ref, str):
            assert fast == ref
        else:
            assert_same_samples(fast, ref)


def test_llava_next_rows_that_are_not_one_grid_raise_as_the_reference():
    model = build_tiny("llava_next")
    adapter, (input_ids, call, embeds) = recorded_sample_media_args(model, batch=2, generate=True)
    newline = model.model.image_newline.detach()
    flags = _newline_flags(embeds, newline, input_ids.numpy() == adapter.image_token_id)
    image_positions = (input_ids == adapter.image_token_id).nonzero()
    ends = image_positions[torch.from_numpy(np.flatnonzero(flags))]
    assert len(ends) > 2
    for change in ("drop a newline", "add a newline", "move a newline"):
        broken = embeds.clone()
        row, col = ends[len(ends) // 2].tolist()
        if change != "add a newline":
            broken[row, col] = 0.5
        if change != "drop a newline":
            broken[row, col - 1] = newline
        fast, ref = _both(adapter, input_ids, call, broken)
        assert isinstance(fast, str) and fast == ref, change


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_newline_flags_equal_a_full_compare_on_every_path(path):
    """The host numpy path (a plain CPU float tensor: two channels screen, the survivors are compared in full), and
    the torch paths (a device tensor, here its stand-in: int64 words when D % 8 == 0, else all()) give the full
    compare's flags, with -0.0 == 0.0 and NaN never equal, as `==` has them; a token matching the two screening
    channels only is not a newline."""
    wrap = (lambda t: t) if path == "numpy" else on_device
    for dim in (16, 12):
        newline = torch.randn(dim)
        newline[0] = 0.0
        embeds = torch.randn(3, 20, dim)
        embeds[0, 4] = newline
        embeds[1, 9] = newline
        embeds[1, 9, 0] = -0.0  # equal as floats
        embeds[2, 3] = newline
        embeds[2, 3, dim - 1] += 1e-6  # one element off
        embeds[2, 5] = newline
        embeds[2, 5, 2] = float("nan")
        embeds[1, 11, 0], embeds[1, 11, -1] = newline[0], newline[-1]  # the screening channels only
        embeds[0, 6] = newline  # not an image token
        is_image = np.zeros((3, 20), dtype=bool)
        is_image[:, 2:15] = True
        is_image[0, 6] = False
        want = (embeds == newline).all(dim=-1)[torch.from_numpy(is_image)].numpy()
        got = _newline_flags(wrap(embeds), wrap(newline), is_image)
        assert got.dtype == bool and np.array_equal(got, want)
        assert got.sum() == 2
        bad = newline.clone()
        bad[1] = float("nan")
        embeds[0, 4] = bad
        assert not _newline_flags(wrap(embeds), wrap(bad), is_image).any()


def test_row_runs_equal_the_per_row_torch_runs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 5), rng.integers(1, 12))) < 0.5
        want = [run for row in torch.from_numpy(mask) for run in _reference_runs(row.nonzero()[:, 0])]
        assert _row_runs(mask) == want


def test_plan_cache_is_bounded_and_keeps_blocks_alive():
    model = build_tiny("llava")
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        for batch in range(1, 9):
            for images in range(3):
                model(**make_inputs(model, batch=batch, num_images=[images] * batch))
        plans = handle.adapter._plans
        assert 0 < len(plans) <= 32
        for plan in plans._plans._items.values():
            assert plan.keep is not None


def test_host_media_of_reuses_the_engines_search_only_for_the_same_ids_and_token_ids():
    from vlm_prune.adapters.media_plan import HOST_MEDIA, HostMedia

    ids = torch.tensor([[1, 3, 3, 2, 4], [3, 2, 2, 2, 2]])
    found = HostMedia(ids, (3, 4))
    call = {HOST_MEDIA: found}
    assert HostMedia.of(ids, (3, 4), call) is found
    other = HostMedia.of(ids, (3,), call)  # another adapter's kinds: a search of its own
    assert other is not found and other.total == 3 and other.row_counts == [2, 1]
    assert other.columns.tolist() == [1, 2, 0]
    copy_of_ids = ids.clone()  # another ids object (e.g. the language model got other ids): not reused
    fresh = HostMedia.of(copy_of_ids, (3, 4), call)
    assert fresh is not found and fresh.columns.tolist() == found.columns.tolist() == [1, 2, 4, 0]
    assert found.first.tolist() == (ids == 3).tolist() and found.row_counts == [3, 1]


def test_the_engine_hands_its_media_search_to_the_adapter():
    model = build_tiny("qwen2_vl")
    adapter, (input_ids, call, embeds) = recorded_sample_media_args(model, batch=2)
    from vlm_prune.adapters.media_plan import HOST_MEDIA, HostMedia

    assert isinstance(call.get(HOST_MEDIA), HostMedia) and call[HOST_MEDIA].source is input_ids


class _LabelsTokens(Method):
    """Keeps every visual token but the first and labels the kept ones (`Selection.group`), as merging methods do;
    records the group each row's layout arrives with."""

    def __init__(self):
        self.seen = []

    def select(self, ctx):
        self.seen.append(ctx.layout.group)
        keep = torch.ones(ctx.num_visual, dtype=torch.bool)
        keep[0] = False
        return Selection(keep, group=torch.arange(ctx.num_visual - 1))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_engine_never_writes_into_a_shared_template_layout(family):
    """The samples hold the plan's template layouts (no copy per call): a stage's labels go to a copy, so the next
    call's rows, served from the same templates, arrive unlabelled and the templates stay as they were."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2)
    method = _LabelsTokens()
    with vlm_prune.pruned(model, method) as handle, torch.no_grad():
        model(**inputs)
        templates = [layout for plan in handle.adapter._plans._plans._items.values() for layout in plan.layouts]
        assert templates and all(layout.group is None for layout in templates)
        model(**inputs)
    assert method.seen == [None] * 4
    assert all(layout.group is None for layout in templates)

"""Video layouts of every video family, against layouts built by hand from the prompt's structure.

Each test writes a small prompt token by token (so the expected visual columns are known without any
adapter code), runs the model under a keep-all method that records what the engine hands it (the
sample's visual columns and `VisualLayout`), and compares with the hand-built columns, media_index, kind,
frame, grid_thw and media_grid. Also: Qwen3-VL's timestamp tokens stay text, OneVision's video newline is
not a visual column (and is never pruned), Qwen2.5-VL's `second_per_grid_ts` reaches the kept tokens'
temporal positions, and a grid that does not match the placeholders raises an `InputError`.
"""

from __future__ import annotations

import math

import pytest
import torch

import vlm_prune
from vlm_prune.adapters import adapter_for
from vlm_prune.engine.context import IMAGE, VIDEO
from vlm_prune.toy_models import (
    BOS_ID,
    IMAGE_ID,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    available_families,
    build_tiny,
)

torch.set_num_threads(1)
FAMILIES = available_families()
_MODELS: dict = {}


def model_of(family: str):
    if family not in FAMILIES:
        pytest.skip(f"{family} is not in this transformers")
    if family not in _MODELS:
        _MODELS[family] = build_tiny(family)
    return _MODELS[family]


class Record(vlm_prune.Method):
    """Keeps everything; remembers (visual columns, layout) of every sample it is shown."""

    layer = 0

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, object]] = []

    def select(self, ctx):
        self.seen.append((ctx.visual_index.clone().cpu(), ctx.layout))
        return torch.ones(ctx.num_visual, dtype=torch.bool)


class DropVisual(vlm_prune.Method):
    """Keeps only the first visual token: everything else the engine calls visual is dropped."""

    layer = 0

    def select(self, ctx):
        keep = torch.zeros(ctx.num_visual, dtype=torch.bool)
        keep[0] = True
        return keep


def recorded_layout(model, inputs: dict):
    method = Record()
    with torch.no_grad(), vlm_prune.pruned(model, method):
        model(**inputs)
    assert len(method.seen) == 1
    return method.seen[0]


# ---------------------------------------------------------------------------------------------------------
# hand-built expectations
# ---------------------------------------------------------------------------------------------------------


class Expected:
    """Accumulates the expected layout item by item, in prompt order."""

    def __init__(self):
        self.columns, self.media_index, self.kind, self.frame, self.grid, self.media_grid = [], [], [], [], [], []

    def add(self, columns: list[int], kind: int, frames: list[int], coords: list[tuple[int, int, int]], grid):
        item = len(self.media_grid)
        self.columns += columns
        self.media_index += [item] * len(columns)
        self.kind += [kind] * len(columns)
        self.frame += frames
        self.grid += coords
        self.media_grid.append(grid)

    def check(self, columns: torch.Tensor, layout) -> None:
        assert columns.tolist() == self.columns
        assert layout.media_index.tolist() == self.media_index
        assert layout.kind.tolist() == self.kind
        assert layout.frame.tolist() == self.frame
        assert [tuple(c) for c in layout.grid_thw.tolist()] == self.grid
        assert [tuple(g) for g in layout.media_grid] == self.media_grid


def raster(frames: int, rows: int, cols: int) -> list[tuple[int, int, int]]:
    return [(t, r, c) for t in range(frames) for r in range(rows) for c in range(cols)]


def anyres_coords(side: int, rows: int, cols: int) -> list[tuple[int, int, int]]:
    """Base (0, r, c), then high-resolution rows (1, r, c) each closed by a newline (-1, -1, -1)."""
    coords = raster(1, side, side)
    for r in range(rows):
        coords += [(1, r, c) for c in range(cols)] + [(-1, -1, -1)]
    return coords


class Prompt:
    """input_ids built token by token; `span(n, token)` returns the columns it wrote."""

    def __init__(self):
        self.ids = [BOS_ID, 11, 12]

    def text(self, *tokens: int) -> list[int]:
        start = len(self.ids)
        self.ids += list(tokens)
        return list(range(start, len(self.ids)))

    def span(self, count: int, token: int) -> list[int]:
        return self.text(*([token] * count))

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.ids + [13, 14, 15]])


# ---------------------------------------------------------------------------------------------------------
# LLaVA-NeXT-Video and LLaVA-OneVision
# ---------------------------------------------------------------------------------------------------------


def llava_video_inputs(model, frames: int, image_first: bool | None):
    """One video of `frames` frames, and (image_first True/False) one square anyres image before/after it."""
    config, family = model.config, model.config.model_type
    size, side = config.vision_config.image_size, config.vision_config.image_size // config.vision_config.patch_size
    pooled = math.ceil(side / 2) if family == "llava_onevision" else side // config.spatial_pool_stride
    # a (2s, 2s) image fits the (2s, 2s) pinpoint: a 2x2 crop grid, nothing unpadded; OneVision
    # ("anyres_max_2") then shrinks the 2side x 2side grid by ratio sqrt(4 side^2 / (2 side^2)) = sqrt(2)
    hires = 2 * side if family != "llava_onevision" else int(2 * side // math.sqrt(2))
    prompt, expected = Prompt(), Expected()
    g = torch.Generator().manual_seed(0)

    def add_image():
        columns = prompt.span(side * side + hires * (hires + 1), IMAGE_ID)
        expected.add(columns, IMAGE, [0] * len(columns), anyres_coords(side, hires, hires), (1, side, side))

    def add_video():
        count = frames * pooled * pooled
        columns = prompt.span(count, VIDEO_ID)
        coords = raster(frames, pooled, pooled)
        expected.add(columns, VIDEO, [c[0] for c in coords], coords, (frames, pooled, pooled))
        newline = prompt.span(1, VIDEO_ID) if family == "llava_onevision" else []
        return newline

    newline = []
    if image_first:
        add_image()
        prompt.text(21)
    newline = add_video()
    if image_first is False:
        prompt.text(22)
        add_image()
    input_ids = prompt.tensor()
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(1, frames, 3, size, size, generator=g),
    }
    if image_first is not None:
        inputs["pixel_values"] = torch.randn(1, 5, 3, size, size, generator=g)
        inputs["image_sizes"] = torch.tensor([[2 * size, 2 * size]])
    return inputs, expected, newline


@pytest.mark.parametrize("image_first", [None, True, False], ids=["video", "image+video", "video+image"])
@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_video_layout(family, image_first):
    model = model_of(family)
    inputs, expected, newline = llava_video_inputs(model, frames=3, image_first=image_first)
    columns, layout = recorded_layout(model, inputs)
    expected.check(columns, layout)
    if family == "llava_onevision":
        assert len(newline) == 1 and newline[0] not in columns.tolist(), "the video newline is not a visual column"


def test_onevision_video_newline_is_never_pruned():
    """Whatever a method drops, the one newline OneVision appends per video stays, as text, with its embedding."""
    model = model_of("llava_onevision")
    inputs, _, newline = llava_video_inputs(model, frames=2, image_first=None)
    with torch.no_grad(), vlm_prune.pruned(model, DropVisual()) as handle:
        model(**inputs)
        kept = handle.last_kept_index[0].tolist()
    assert newline[0] in kept
    assert handle.stats.visual_tokens_in == 2 * 9, "2 frames of 3x3 pooled tokens, newline excluded"


def test_onevision_multi_image_prompt_and_video():
    """Two images in one prompt are base grid + one newline each (batch_num_images); then a video."""
    model = model_of("llava_onevision")
    size = model.config.vision_config.image_size
    side = size // model.config.vision_config.patch_size
    prompt, expected = Prompt(), Expected()
    for _ in range(2):
        columns = prompt.span(side * side + 1, IMAGE_ID)
        expected.add(columns, IMAGE, [0] * len(columns), raster(1, side, side) + [(-1, -1, -1)], (1, side, side))
        prompt.text(23)
    columns = prompt.span(2 * 9, VIDEO_ID)
    expected.add(columns, VIDEO, [0] * 9 + [1] * 9, raster(2, 3, 3), (2, 3, 3))
    prompt.span(1, VIDEO_ID)
    input_ids = prompt.tensor()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 1, 3, size, size, generator=g),
        "image_sizes": torch.tensor([[size, size], [size, 2 * size]]),
        "batch_num_images": torch.tensor([2]),
        "pixel_values_videos": torch.randn(1, 2, 3, size, size, generator=g),
    }
    expected.check(*recorded_layout(model, inputs))


# ---------------------------------------------------------------------------------------------------------
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL
# ---------------------------------------------------------------------------------------------------------


def qwen_inputs(model, video_first: bool, frames: int = 2, seconds: float = 1.0):
    """One image (grid 1x4x4 patches: 2x2 merged) and one video (frames x 4 x 4 patches), in either order."""
    family = model.config.model_type
    vision = model.config.vision_config
    dim = 3 * vision.temporal_patch_size * vision.patch_size**2
    prompt, expected = Prompt(), Expected()
    timestamps = []

    def add_image():
        prompt.text(VISION_START_ID)
        columns = prompt.span(4, IMAGE_ID)
        prompt.text(VISION_END_ID)
        expected.add(columns, IMAGE, [0] * 4, raster(1, 2, 2), (1, 2, 2))

    def add_video():
        columns = []
        if family == "qwen3_vl":  # "<t seconds>" text, then the frame wrapped in vision start/end
            for _ in range(frames):
                timestamps.extend(prompt.text(31, 32, 33))
                prompt.text(VISION_START_ID)
                columns += prompt.span(4, VIDEO_ID)
                prompt.text(VISION_END_ID)
        else:
            prompt.text(VISION_START_ID)
            columns = prompt.span(4 * frames, VIDEO_ID)
            prompt.text(VISION_END_ID)
        coords = raster(frames, 2, 2)
        expected.add(columns, VIDEO, [c[0] for c in coords], coords, (frames, 2, 2))

    first, second = (add_video, add_image) if video_first else (add_image, add_video)
    first()
    prompt.text(24)
    second()
    input_ids = prompt.tensor()
    g = torch.Generator().manual_seed(2)
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == IMAGE_ID], mm[input_ids == VIDEO_ID] = 1, 2
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm,
        "pixel_values": torch.randn(16, dim, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(16 * frames, dim, generator=g),
        "video_grid_thw": torch.tensor([[frames, 4, 4]]),
    }
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([seconds])
    return inputs, expected, timestamps


@pytest.mark.parametrize("video_first", [False, True], ids=["image+video", "video+image"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_layout(family, video_first):
    model = model_of(family)
    inputs, expected, timestamps = qwen_inputs(model, video_first, frames=3)
    columns, layout = recorded_layout(model, inputs)
    expected.check(columns, layout)
    if family == "qwen3_vl":
        assert len(timestamps) == 9 and not set(timestamps) & set(columns.tolist()), "timestamps stay text"


def test_qwen25_second_per_grid_ts_reaches_the_kept_positions():
    """Qwen2.5-VL's temporal M-RoPE coordinate is t * tokens_per_second * second_per_grid_ts; the pruned
    forward equals the reference built from the model's own positions, for a non-default interval."""
    from reference import capture, reference_row

    model = model_of("qwen2_5_vl")
    inputs, expected, _ = qwen_inputs(model, video_first=False, frames=3, seconds=1.5)
    cap = capture(model, inputs)
    video_columns = torch.tensor([c for c, k in zip(expected.columns, expected.kind) if k == VIDEO])
    temporal = cap.positions[0, 0, video_columns]
    step = model.config.vision_config.tokens_per_second * 1.5
    assert (temporal[4:8] - temporal[:4]).tolist() == [int(step)] * 4, "frame 1 sits tokens_per_second * 1.5 later"
    keep = torch.tensor([i % 3 != 1 for i in range(len(expected.columns))])
    ref = reference_row(model, cap, 0, keep)

    class Fixed(vlm_prune.Method):
        layer = 0

        def select(self, ctx):
            return keep.clone()

    with torch.no_grad(), vlm_prune.pruned(model, Fixed()) as handle:
        logits = model(**inputs).logits[0]
        assert handle.last_kept_index[0].tolist() == ref.kept_cols.tolist()
    torch.testing.assert_close(logits, ref.logits, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# a grid that does not match the placeholders
# ---------------------------------------------------------------------------------------------------------


def _sample_media(model, inputs: dict, **override):
    call = {**inputs, **override}
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    return adapter_for(model).sample_media(inputs["input_ids"], call, embeds)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_grid_mismatch_is_a_clear_input_error(family):
    model = model_of(family)
    inputs, _, _ = qwen_inputs(model, video_first=False, frames=2)
    with pytest.raises(vlm_prune.InputError, match="video_grid_thw does not match the placeholders. Pass"):
        _sample_media(model, inputs, video_grid_thw=torch.tensor([[3, 4, 4]]))  # 3 frames for 2 frames' tokens
    with pytest.raises(vlm_prune.InputError, match="does not match the placeholders. Pass the processor"):
        _sample_media(model, inputs, video_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4], [1, 4, 4]]))


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_video_grid_mismatch_is_a_clear_input_error(family):
    model = model_of(family)
    inputs, _, _ = llava_video_inputs(model, frames=3, image_first=None)
    size = model.config.vision_config.image_size
    with pytest.raises(vlm_prune.InputError, match="does not match the placeholders. Build input_ids and"):
        _sample_media(model, inputs, pixel_values_videos=torch.zeros(1, 2, 3, size, size))  # 2 frames, not 3
    with pytest.raises(vlm_prune.InputError, match="pixel_values_videos"):
        _sample_media(model, inputs, pixel_values_videos=None)
    assert issubclass(vlm_prune.InputError, vlm_prune.PruneError)


def test_supported_models_lists_the_video_families():
    names = vlm_prune.supported_models()
    assert "LlavaOnevisionForConditionalGeneration" in names
    assert "LlavaNextVideoForConditionalGeneration" in names


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_two_videos_in_one_prompt_whole_and_chunked(family):
    """Two videos of one prompt are two media items, frames counted per video; a generate() chunk that hands
    both videos' features as one block splits them at the text between them (runs of video tokens)."""
    model = model_of(family)
    config = model.config
    size, side = config.vision_config.image_size, config.vision_config.image_size // config.vision_config.patch_size
    pooled = math.ceil(side / 2) if family == "llava_onevision" else side // config.spatial_pool_stride
    newline = 1 if family == "llava_onevision" else 0
    prompt, expected = Prompt(), Expected()
    for _ in range(2):
        columns = prompt.span(2 * pooled * pooled, VIDEO_ID)
        coords = raster(2, pooled, pooled)
        expected.add(columns, VIDEO, [c[0] for c in coords], coords, (2, pooled, pooled))
        prompt.span(newline, VIDEO_ID)
        prompt.text(25, 26)
    input_ids = prompt.tensor()
    g = torch.Generator().manual_seed(3)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(2, 2, 3, size, size, generator=g),
    }
    expected.check(*recorded_layout(model, inputs))
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), vlm_prune.pruned(model, DropVisual()) as handle:
        whole = model.generate(**inputs, **kwargs)
        per_item = handle.stats.stages[0].tokens_in
        chunked = model.generate(**inputs, prefill_chunk_size=len(prompt.ids) - 1, **kwargs)
        assert handle.stats.stages[0].tokens_in == per_item == [[2 * pooled * pooled] * 2]
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_frames_or_image_sizes_that_disagree_with_the_placeholders(family):
    """`check_media_inputs` (run by the engine before the model's own shape error) refuses video frames and
    image sizes that do not match the placeholders, and accepts the processor's inputs."""
    model = model_of(family)
    adapter = adapter_for(model)
    size = model.config.vision_config.image_size
    inputs, _, _ = llava_video_inputs(model, frames=3, image_first=True)
    adapter.check_media_inputs(inputs)
    with pytest.raises(vlm_prune.InputError, match="does not match the placeholders"):
        adapter.check_media_inputs({**inputs, "pixel_values_videos": torch.zeros(1, 4, 3, size, size)})
    with pytest.raises(vlm_prune.InputError, match="image_sizes asks for"):
        adapter.check_media_inputs({**inputs, "image_sizes": torch.tensor([[size, size]])})

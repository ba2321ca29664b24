"""Adapters for the LLaVA video families: LLaVA-OneVision and LLaVA-NeXT-Video (transformers 5.x).

Images are LLaVA-NeXT "anyres" images (base grid, then the unpadded high-resolution rows, each closed by a
newline token; see `LlavaNextAdapter`). Videos are one pooled grid per frame, frames in order:
- LLaVA-OneVision (`LlavaOnevisionModel.get_video_features`): each frame's (side x side) patch grid is halved
  by bilinear interpolation to ceil(side / 2) per axis, then the model appends ONE `image_newline` vector per
  video. That newline is a placeholder token (video token id) but carries no frame: the adapter leaves it out
  of the sample's visual columns, so the engine treats it as text and it is never pruned (it stays at its
  own position, which is also what a method that "keeps the video's structure" needs).
- LLaVA-NeXT-Video (`LlavaNextVideoPooler`): each frame's grid is pooled with kernel = stride =
  `spatial_pool_stride`, giving side // stride per axis; no newline.

Counts come from token ids and grid metadata only: frames from `pixel_values_videos` (videos, frames, 3, H,
W) or, when generate() pre-encoded the media, from each encoded item's length (`mm_encoder_outputs`); the
per-frame grid from the vision config and the pooling stride. A chunk of generate(prefill_chunk_size=N)
receives all its video features as one block; its videos are then the runs of consecutive video tokens.

Layout: a video token of frame t, pooled row r and column c gets kind VIDEO, frame t and grid (t, r, c);
`media_grid` is (frames, rows, cols). One temporal step is one frame on both families.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, SampleMedia, item_counts
from vlm_prune.adapters.llava import LlavaNextAdapter, _grid_block, _layout_key
from vlm_prune.adapters.media_plan import EMPTY_LAYOUT, HostMedia, MediaPlan, PlanCache, build_plan, empty_samples
from vlm_prune.engine.context import IMAGE, VIDEO, VisualLayout
from vlm_prune.engine.lru import SmallLRU
from vlm_prune.errors import InputError, PruneError


def _video_token_id(config) -> int:
    for name in ("video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise PruneError("the model config has no video_token_id; cannot find the video tokens")


def _row_runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of consecutive set entries of a (B, L) host bool mask, row by row, left to right."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)  # a clear entry either side of each row
    padded[:, 1:-1] = mask
    edges = np.diff(padded.reshape(-1))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


@functools.lru_cache(maxsize=256)
def _video_block(frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, 3) (t, row, col) coordinates, frame by frame in raster order (cached: read-only)."""
    return torch.cat([_grid_block(0, rows, cols, t=t) for t in range(frames)])


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video: LLaVA-NeXT images plus videos of pooled per-frame grids."""

    family = "llava_next_video"
    #: placeholder tokens a video adds after its frames (OneVision: one newline)
    video_trailing_tokens = 0

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.video_token_id = _video_token_id(model.config)
        self._merged_layouts: SmallLRU = SmallLRU(32)  # per-sample layouts by their items (`_merge_pieces`)
        self._plans = PlanCache(32)  # per-batch plans by (rows' media-kind sequences, items)

    def media_token_ids(self) -> list[int]:
        return [self.image_token_id, self.video_token_id]

    # ---- video grids ---------------------------------------------------------------------------
    def frame_grid(self) -> tuple[int, int]:
        """(rows, cols) of one pooled frame: the patch grid pooled by `spatial_pool_stride`."""
        stride = int(self.model.config.spatial_pool_stride)
        side = self._grid_side()
        return side // stride, side // stride

    def video_grids(self, input_ids: torch.Tensor, call: dict) -> list[tuple[int, int, int]]:
        """(frames, rows, cols) of every video of the call, in (row, column) order of their placeholders."""
        rows, cols = self.frame_grid()
        per_frame, extra = rows * cols, self.video_trailing_tokens
        is_video = input_ids.cpu().numpy() == self.video_token_id  # the host ids (numpy: ~1 us a call, torch 5-10)
        placeholders = is_video.sum(axis=1).tolist()
        counts = item_counts(call, "video")
        if counts is None:
            pixel_values = call.get("pixel_values_videos")
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5:
                raise InputError(
                    f"{self.family}: the prompt holds video tokens but the call has no pixel_values_videos of "
                    "shape (videos, frames, 3, H, W); pass the processor's pixel_values_videos with its input_ids. "
                    f"{SPLIT_MEDIA_HINT}"
                )
            videos, frames = int(pixel_values.shape[0]), int(pixel_values.shape[1])
            counts = [frames * per_frame + extra] * videos
        elif len(counts) == 1 and counts[0] == sum(placeholders):
            # one block: a single video, or a chunk of generate(prefill_chunk_size=N) holding several
            # videos' features; its videos are the runs of consecutive video tokens
            counts = _row_runs(is_video)
        if sum(counts) != sum(placeholders):
            raise InputError(
                f"{self.family}: the prompt holds {sum(placeholders)} video tokens but the videos need "
                f"{sum(counts)} ({len(counts)} videos of {per_frame} tokens per frame"
                f"{' plus one newline' if extra else ''}); the video grid does not match the placeholders. Build "
                "input_ids and pixel_values_videos with the same processor call, with the same number of frames"
            )
        grids = []
        for count in counts:
            frames, rest = divmod(count - extra, per_frame)
            if rest or frames < 1:
                raise InputError(
                    f"{self.family}: a video of {count} tokens is not a whole number of frames of {per_frame} "
                    f"tokens{' plus one newline' if extra else ''}; pass the processor's input_ids and "
                    f"pixel_values_videos unchanged. {SPLIT_MEDIA_HINT}"
                )
            grids.append((frames, rows, cols))
        return grids

    def check_media_inputs(self, call: dict) -> None:
        """Images as on LLaVA-NeXT; the video placeholders must be what the videos' frames need."""
        super().check_media_inputs(call)
        input_ids = call.get("input_ids")
        if call.get("pixel_values_videos") is not None and isinstance(input_ids, torch.Tensor):
            self.video_grids(input_ids, call)  # raises InputError when frames and placeholders disagree

    # ---- samples -------------------------------------------------------------------------------
    def sample_media(self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor) -> list[SampleMedia]:
        # the columns from one flatnonzero over the host ids; which item every placeholder belongs to is a pure
        # function of the rows' media-kind sequences and the items, planned once per such signature (`media_plan`)
        host = HostMedia.of(input_ids, (self.image_token_id, self.video_token_id), call)
        if not host.total:
            return empty_samples(host.batch)
        has_images, has_videos = host.present
        image_blocks = self.image_blocks(input_ids, call, inputs_embeds, host) if has_images else []
        video_grids = self.video_grids(input_ids, call) if has_videos else []
        items = (_layout_key(image_blocks), tuple(video_grids))
        return self._plans.samples(host, items, lambda: self._plan(host, image_blocks, video_grids))

    def _plan(self, host: HostMedia, image_blocks: list[torch.Tensor], video_grids: list[tuple]) -> MediaPlan:
        """Each row takes the next whole images and videos (in order) its placeholders of each kind hold; on
        ranks (see `media_plan`): `columns` below are positions among the row's media tokens."""
        next_image = next_video = 0
        rows = []
        for image_columns, video_columns in host.row_ranks():
            pieces = []  # (first column, kind, visual columns (numpy), (n, 3) grid coordinates, media grid)
            columns = image_columns
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
            columns = video_columns
            start = 0
            while start < len(columns):
                if next_video >= len(video_grids):
                    raise InputError(f"more video tokens than videos; check the processor output. {SPLIT_MEDIA_HINT}")
                frames, grid_rows, grid_cols = video_grids[next_video]
                next_video += 1
                count = frames * grid_rows * grid_cols
                item = columns[start : start + count + self.video_trailing_tokens]
                if len(item) != count + self.video_trailing_tokens:
                    raise InputError(f"video tokens of a sample do not match whole videos. {SPLIT_MEDIA_HINT}")
                # the trailing newline (OneVision) stays out of the visual columns: a text token, never pruned
                grid = (frames, grid_rows, grid_cols)
                pieces.append((int(item[0]), VIDEO, item[:count], _video_block(*grid), grid))
                start += len(item)
            rows.append(_merge_pieces(pieces, self._merged_layouts))
        if next_image != len(image_blocks) or next_video != len(video_grids):
            raise InputError(
                f"{self.family}: the call brings {len(image_blocks)} images and {len(video_grids)} videos but the "
                f"placeholders hold {next_image} and {next_video}; pass the processor's input_ids with the media "
                f"it was built for. {SPLIT_MEDIA_HINT}"
            )
        return build_plan(host, rows, keep=list(image_blocks))


@functools.lru_cache(maxsize=256)
def _image_grid(block: torch.Tensor) -> tuple[int, int, int]:
    """(1, H, W) media grid of an image block: its base grid (t == 0). Blocks are cached objects (hashed by id)."""
    base = block[block[:, 0] == 0]
    return (1, int(base[:, 1].max()) + 1, int(base[:, 2].max()) + 1) if len(base) else (1, 1, 1)


def _merge_pieces(pieces: list[tuple], cache: SmallLRU) -> tuple[np.ndarray, VisualLayout]:
    """Visual columns and layout of one sample from its media items, numbered in order of appearance.

    pieces: (first column, kind, visual columns (numpy), (n, 3) grid coordinates, media grid) per item, in any
    order; cache: layouts by the items' (kind, block, grid, count) sequence (blocks are cached objects: an entry
    keeps them alive, so their ids stay unique). The layout is a template (handed out through fresh copies).
    """
    if not pieces:
        return np.zeros(0, dtype=np.int64), EMPTY_LAYOUT
    pieces = sorted(pieces, key=lambda piece: piece[0])
    columns = np.concatenate([piece[2] for piece in pieces])
    key = tuple((piece[1], id(piece[3]), piece[4], len(piece[2])) for piece in pieces)
    layout, _ = cache.get(key, lambda: (_merged_layout(pieces), [piece[3] for piece in pieces]))
    return columns, layout


def _merged_layout(pieces: list[tuple]) -> VisualLayout:
    grid_thw = torch.cat([piece[3] for piece in pieces])
    media_index = torch.cat([torch.full((len(piece[2]),), i, dtype=torch.long) for i, piece in enumerate(pieces)])
    kind = torch.cat([torch.full((len(piece[2]),), piece[1], dtype=torch.long) for piece in pieces])
    frame = torch.where(kind == VIDEO, grid_thw[:, 0], torch.zeros_like(kind))
    return VisualLayout(media_index, kind, frame, grid_thw, [piece[4] for piece in pieces])


class LlavaOnevisionAdapter(LlavaNextVideoAdapter):
    """LLaVA-OneVision: anyres_max_N images (base + one newline per image of a multi-image prompt) and videos
    of ceil(side / 2)-pooled frames closed by one newline (left as text; see the module docstring)."""

    family = "llava_onevision"
    video_trailing_tokens = 1

    def frame_grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame after `apply_pooling`: bilinear resize to ceil(side / 2) per axis."""
        side = math.ceil(self._grid_side() / 2)
        return side, side

    def _tokens_per_image(self) -> int:
        """The base grid: the model requires (image_size / patch_size)^2 features (SigLIP has no CLS token)."""
        return self._grid_side() ** 2

    def _split_image_runs(self, counts: list[int], is_newline: np.ndarray | None) -> list[int]:
        """Split a chunk's block of multi-image-prompt images (base + newline each, a fixed size) into images.

        is_newline: (N,) host bool, whether each of the call's image tokens is the `image_newline` vector. An anyres
        image has a base grid then rows of width >= 1, so a newline right after its base marks the fixed-size
        multi-image unit instead.
        """
        unit = self._grid_side() ** 2 + 1
        if is_newline is None:
            return counts
        out, start = [], 0
        for count in counts:
            item = is_newline[start : start + count]
            start += count
            ends = item[unit - 1 :: unit] if count % unit == 0 else item[:0]
            if count > unit and len(ends) and bool(ends.all()):
                out += [unit] * (count // unit)
            else:
                out.append(count)
        return out

    def _counts_from_sizes(self, call: dict) -> list[int]:
        """Tokens of each image from `image_sizes` and `batch_num_images`, as `pack_image_features` packs them.

        The "anyres_max_N" setting is the config's: the model's forward does not pass a `vision_aspect_ratio`
        kwarg on to its image encoder (generate() does, but its calls carry the encoded items, counted as such).
        """
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        config = self.model.config
        image_sizes = call.get("image_sizes")
        if image_sizes is None:
            raise InputError("LLaVA-OneVision needs image_sizes (the processor returns them)")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
        per_sample = call.get("batch_num_images")
        if per_sample is None:
            patched = [True] * len(sizes)
        else:
            per_sample = per_sample.tolist() if isinstance(per_sample, torch.Tensor) else list(per_sample)
            patched = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        max_patches = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        side = self._grid_side()
        counts = []
        for size, with_crops in zip(sizes, patched, strict=True):
            if not with_crops:  # an image of a multi-image prompt: its base grid and one newline
                counts.append(side * side + 1)
                continue
            image_size = config.vision_config.image_size
            num_h, num_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, image_size)
            height, width = unpad_image(torch.zeros(1, num_h * side, num_w * side), torch.tensor(size)).shape[-2:]
            ratio = math.sqrt(height * width / (max_patches * side**2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
            counts.append(side * side + height * (width + 1))
        return counts

"""Adapters for LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Media spans come from the image token id and the vision config, never from fixed offsets:
- LLaVA: every image contributes the same number of tokens (patches, plus CLS under the "full" strategy);
  the count is total image tokens / number of images.
- LLaVA-NeXT ("anyres"): an image contributes its base grid, then the unpadded high-resolution grid
  row by row, each row closed by a newline token. Counts follow `image_sizes`, computed with the model's
  own helpers. Layout: base tokens get (0, h, w); high-resolution tokens get (1, row, col); newline
  tokens get grid (-1, -1, -1).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, Adapter, ProjectorParts, SampleMedia, item_counts
from vlm_prune.adapters.media_plan import HostMedia, MediaPlan, PlanCache, build_plan, empty_samples
from vlm_prune.engine.context import IMAGE, VisualLayout
from vlm_prune.engine.lru import SmallLRU
from vlm_prune.errors import InputError, PruneError
from vlm_prune.kernels.reference import numpy_viewable


def _image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise PruneError("the model config has no image_token_id; cannot find the image tokens")


def _square_grid(count: int) -> tuple[int, int, int]:
    """(offset, h, w) for a block of `count` tokens: a square grid, possibly after one CLS token."""
    side = math.isqrt(count)
    if side * side == count:
        return 0, side, side
    side = math.isqrt(count - 1)
    if side * side == count - 1:
        return 1, side, side
    return 0, 1, count


def _layout_from_blocks(blocks: list[torch.Tensor]) -> VisualLayout:
    """Concatenate per-image (n, 3) grid coordinates into one layout (images, in order)."""
    if not blocks:
        empty = torch.zeros(0, dtype=torch.long)
        return VisualLayout(empty, empty.clone(), empty.clone(), torch.zeros(0, 3, dtype=torch.long), [])
    media_index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(blocks)])
    grid_thw = torch.cat(blocks) if blocks else torch.zeros(0, 3, dtype=torch.long)
    frame = torch.zeros_like(media_index)
    grids = []
    for block in blocks:
        base = block[block[:, 0] == 0]
        h = int(base[:, 1].max()) + 1 if len(base) else 1
        w = int(base[:, 2].max()) + 1 if len(base) else 1
        grids.append((1, h, w))
    return VisualLayout(
        media_index=media_index,
        kind=torch.full_like(media_index, IMAGE),
        frame=frame,
        grid_thw=grid_thw,
        media_grid=grids,
    )


@functools.lru_cache(maxsize=256)
def _grid_block(offset: int, h: int, w: int, t: int = 0) -> torch.Tensor:
    """(offset + h * w, 3) (t, row, col) coordinates of a raster grid after `offset` grid-less (-1) tokens.

    Cached per shape (a pure function; callers never write into it): the same image size recurs every call.
    """
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = torch.stack([torch.full_like(rows, t), rows, cols], dim=-1).reshape(-1, 3)
    if offset:
        block = torch.cat([torch.full((offset, 3), -1, dtype=torch.long), block])
    return block


@functools.lru_cache(maxsize=64)
def _square_blocks(counts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The `_grid_block` of every image of `counts` tokens (a square grid, possibly after a CLS token): once per
    call signature (a batch of B images asks the same every call), the same (cached) blocks as one by one."""
    return tuple(_grid_block(*_square_grid(count)) for count in counts)


@functools.lru_cache(maxsize=256)
def _hires_block(rows: int, width: int, base: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT anyres block: `base` (the base grid), then `rows` rows of `width` tokens (1, row, col), each
    closed by a newline token (-1, -1, -1). Cached per shape, like `_grid_block`."""
    index = torch.arange(rows * (width + 1))
    row, col = index // (width + 1), index % (width + 1)
    hires = torch.stack([torch.ones_like(row), row, col], dim=-1)
    hires[col == width] = -1
    return torch.cat([base, hires])


@functools.lru_cache(maxsize=256)
def _padded_block(extra: int, base: torch.Tensor) -> torch.Tensor:
    """`base`, then `extra` grid-less (-1, -1, -1) tokens: an anyres image of a model without `image_newline`.
    Cached per shape, like `_hires_block`, so that every block is a cached object (the layout caches key on ids)."""
    return torch.cat([base, torch.full((extra, 3), -1, dtype=torch.long)])


@functools.lru_cache(maxsize=256)
def _newline_pattern(width: int, rows: int) -> bytes:
    """The newline flags (as bytes) of `rows` rows of `width` tokens, each closed by a newline."""
    return (b"\x00" * width + b"\x01") * rows


_EIGHT_TRUE = int.from_bytes(b"\x01" * 8, "little")  # eight bools, all True, read as one int64


def _newline_flags(inputs_embeds: torch.Tensor, newline: torch.Tensor, is_image: np.ndarray) -> np.ndarray:
    """(N,) host bool: whether each image token of the call (row-major) is the `image_newline` vector.

    is_image: (B, L) host bool. Compared in place on the columns from the first to the last image token (a view:
    no copy, no text columns), in ONE device->host read; several rows of a plain CPU float tensor in numpy
    (`_host_newline_flags`).
    """
    columns = np.flatnonzero(is_image.any(axis=0))
    if not len(columns):
        return np.zeros(0, dtype=bool)
    first, end = int(columns[0]), int(columns[-1]) + 1
    span = inputs_embeds[:, first:end]
    # (numpy for several rows only: in situ, inside generate(), one row's torch compare is the lighter, 0.49 against
    # 0.58 ms of hooks per llava_next prefill, while at batch 8 numpy saves 0.1 ms: 1.24 against 1.34)
    if span.shape[0] > 1 and span.is_floating_point() and numpy_viewable(span) and newline.device.type == "cpu":
        return _host_newline_flags(span, newline, is_image[:, first:end])
    same = span == newline.to(span.dtype)
    if same.device.type == "cpu" and same.shape[-1] % 8 == 0:
        # torch's bool all() over the last dim is ~2x slower on CPU than comparing eight flags at once, as one
        # int64 word (a bool is one byte, 0 or 1)
        flags = (same.view(torch.int64) == _EIGHT_TRUE).all(dim=-1)
    else:
        flags = same.all(dim=-1)
    return flags.cpu().numpy()[is_image[:, first:end]]


def _host_newline_flags(span: torch.Tensor, newline: torch.Tensor, is_image: np.ndarray) -> np.ndarray:
    """`_newline_flags` of a CPU span (B, S, D) with is_image (B, S), in numpy: two channels (strided views, B * S
    values each) screen the tokens, and only those that match both are compared in full. The same flags as the
    full float compare (a newline matches every channel; NaN never does), in ~a quarter of its time (warm, b8)."""
    values, line = span.numpy(), newline.detach().to(span.dtype).numpy()
    candidates = (values[..., 0] == line[0]) & (values[..., -1] == line[-1]) & is_image
    rows, slots = np.nonzero(candidates)
    flags = np.zeros(candidates.shape, dtype=bool)
    flags[rows, slots] = (values[rows, slots] == line).all(axis=-1)
    return flags[is_image]


def _size_keys(call: dict) -> list[tuple[int, ...]]:
    """The call's `image_sizes`, one (height, width) tuple per image; a clear error when the call has none."""
    image_sizes = call.get("image_sizes")
    if image_sizes is None:
        raise InputError("LLaVA-NeXT needs image_sizes (the processor returns them)")
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
    return [tuple(int(v) for v in size) for size in sizes]


def _layout_key(blocks: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(id(block) for block in blocks)


class LlavaAdapter(Adapter):
    family = "llava"
    signals = frozenset({"projector", "vision_attention"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.image_token_id = _image_token_id(model.config)
        # per-sample layouts keyed by the (cached, so stable) blocks they are made of; an entry keeps its blocks
        # alive, so their ids cannot be reused while it is stored
        self._layouts: SmallLRU[tuple[VisualLayout, list]] = SmallLRU(32)
        self._grid_of_size: dict[tuple, tuple[int, int]] = {}  # (LLaVA-NeXT: high-resolution rows, width)
        self._plans = PlanCache(32)  # per-batch plans by (rows' image-token counts, the blocks' ids)

    def _cached_layout(self, blocks: list[torch.Tensor]) -> VisualLayout:
        """`_layout_from_blocks(blocks)`, cached: a template, handed out only through the plans' fresh copies."""
        layout, _ = self._layouts.get(_layout_key(blocks), lambda: (_layout_from_blocks(blocks), list(blocks)))
        return layout

    def media_token_ids(self) -> list[int]:
        return [self.image_token_id]

    def image_blocks(
        self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor, host: HostMedia | None = None
    ) -> list[torch.Tensor]:
        """(n_i, 3) grid coordinates of every image of the batch, in order. `host`: the call's media search, if made
        (its image mask and counts are reused)."""
        if host is not None and host.token_ids[0] == self.image_token_id:
            total = int(np.count_nonzero(host.first)) if len(host.token_ids) > 1 else host.total
        else:
            total = int(np.count_nonzero(input_ids.cpu().numpy() == self.image_token_id))
        counts = item_counts(call, "image")
        if counts is None:
            pixel_values = call.get("pixel_values")
            num_images = int(pixel_values.shape[0]) if pixel_values is not None else 0
            if num_images == 0 or total % num_images:
                raise InputError(
                    f"found {total} image tokens for {num_images} images; pass pixel_values with one image per "
                    f"<image> placeholder group, as the processor builds them. {SPLIT_MEDIA_HINT}"
                )
            counts = [total // num_images] * num_images
        per_image = self._tokens_per_image()
        if len(counts) == 1 and counts[0] != per_image and counts[0] % per_image == 0:
            # generate(prefill_chunk_size=N) hands a chunk all its images' features as one block
            counts = [per_image] * (counts[0] // per_image)
        return list(_square_blocks(tuple(counts)))

    def _grid_side(self) -> int:
        """Patches along one side of the vision tower's square input grid.

        Read once per adapter: the tower's weights (its position table) fix this geometry, and transformers' config
        lookups cost ~3-5 us each, several per prefill."""
        side = self.__dict__.get("_side")
        if side is None:
            side = self._side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        return side

    def _tokens_per_image(self) -> int:
        """Tokens of one image's base grid: (image_size / patch_size)^2, plus the CLS token under "full"."""
        full = self.__dict__.get("_full")
        if full is None:  # (read once, as `_grid_side`)
            full = self._full = getattr(self.model.config, "vision_feature_select_strategy", "") == "full"
        return self._grid_side() ** 2 + (1 if full else 0)

    def sample_media(self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor) -> list[SampleMedia]:
        # the columns from one flatnonzero over the host ids; which image each row holds is a pure function of the
        # rows' image-token counts and the blocks, planned once per such signature (`media_plan`)
        host = HostMedia.of(input_ids, (self.image_token_id,), call)
        if not host.total:
            return empty_samples(host.batch)
        blocks = self.image_blocks(input_ids, call, inputs_embeds, host)
        return self._plans.samples(host, _layout_key(blocks), lambda: self._plan(host, blocks))

    def _plan(self, host: HostMedia, blocks: list[torch.Tensor]) -> MediaPlan:
        """Each row takes the next whole images (in order) that its image tokens add up to."""
        sizes = [len(block) for block in blocks]
        rows, next_block = [], 0
        for total in host.row_counts:
            first, count = next_block, 0
            while count < total:
                if next_block >= len(blocks):
                    raise InputError(f"more image tokens than images; check the processor output. {SPLIT_MEDIA_HINT}")
                count += sizes[next_block]
                next_block += 1
            if count != total:
                raise InputError(f"image tokens of a sample do not match whole images. {SPLIT_MEDIA_HINT}")
            rows.append((None, self._cached_layout(blocks[first:next_block])))
        return build_plan(host, rows, keep=list(blocks))

    def projector_module(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def projector_parts(self) -> ProjectorParts:
        projector = self.projector_module()
        tail = nn.Sequential(projector.act, projector.linear_2)  # modules: methods can read dtypes and layers
        return ProjectorParts(projector.linear_1.weight, projector.linear_1.bias, tail)

    def vision_attention_layer(self) -> nn.Module:
        """The ViT layer producing the features the projector reads (VisionZip's attentions[-2])."""
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel in transformers 4.x wraps one
        layers = tower.encoder.layers
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        return layers[feature_layer if feature_layer < 0 else feature_layer - 1]

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> object:
        from vlm_prune.adapters.vision_signals import clip_layer_cls_attention, vit_layer_mean_attention

        hidden = args[0] if args else kwargs["hidden_states"]
        if getattr(self.model.config, "vision_feature_select_strategy", "default") == "default":
            return clip_layer_cls_attention(module, hidden)  # CLS query; CLS column dropped
        received, keys = vit_layer_mean_attention(module, hidden)  # "full": every token is a placeholder
        return received, keys

    def vision_attention_rows(self, recorded: list, call: dict):
        received, keys = recorded[-1]
        return {"image": received.reshape(-1)}, {"image": keys.reshape(-1, keys.shape[-1])}

    def projector_rows(self, captured: list[torch.Tensor], call: dict) -> dict[str, torch.Tensor]:
        features = captured[-1]
        return {"image": features.reshape(-1, features.shape[-1])}


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    signals = frozenset()  # anyres packs crops after the projector: no per-token mapping of tower signals yet

    def image_blocks(
        self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor, host: HostMedia | None = None
    ) -> list[torch.Tensor]:
        """Base grid, then the high-resolution rows; row ends are found from the newline embedding.

        generate() forwards neither pixel values nor image sizes (only the encoded features), so the
        rows are recovered from where the model's `image_newline` vector sits in `inputs_embeds`.
        """
        side, base_count = self._grid_side(), self._tokens_per_image()
        if host is not None and host.token_ids[0] == self.image_token_id:  # the call's media search: reused
            is_image = host.first
            with_images = host.row_counts if len(host.token_ids) == 1 else is_image.sum(axis=1).tolist()
        else:
            is_image = input_ids.cpu().numpy() == self.image_token_id  # the host ids (numpy: ~1 us, torch 5-10)
            with_images = is_image.sum(axis=1).tolist()
        total = sum(with_images)
        newline = getattr(self.model.model, "image_newline", None)
        if newline is not None and base_count == side * side:  # the grids from image_sizes, when the call has them
            blocks = self._blocks_from_sizes(call, total, side)
            if blocks is not None:
                return blocks
        all_newline = None if newline is None else _newline_flags(inputs_embeds, newline, is_image)
        counts = item_counts(call, "image")
        if counts is None:
            counts = self._counts_from_sizes(call)
        with_images = [count for count in with_images if count]
        if len(counts) == 1 and len(with_images) > 1 and counts[0] == sum(with_images):
            # generate(prefill_chunk_size=N) hands a chunk all its images' features as one block; rows
            # separate images, and the row check below refuses a row that holds more than one
            counts = with_images
        counts = self._split_image_runs(counts, all_newline)
        if sum(counts) != total:
            raise InputError(
                f"LLaVA-NeXT: {total} image tokens but the images need {sum(counts)}; "
                f"pass the processor's input_ids, pixel_values and image_sizes unchanged. {SPLIT_MEDIA_HINT}"
            )
        base = _grid_block(base_count - side * side, side, side, t=0)
        # the newline flags as bytes: an image's rows are one grid exactly when its high-resolution part is the
        # pattern (width zeros, a one) * rows, width = where its first newline sits (a C-level find and compare
        # per image, not numpy calls)
        flags = None if all_newline is None else all_newline.tobytes()
        blocks, start = [], 0
        for count in counts:
            rest_start, start = start + base_count, start + count
            if count <= base_count:  # no high-resolution rows (a later check refuses a count below the base grid)
                blocks.append(base)
                continue
            if flags is None:
                blocks.append(_padded_block(count - base_count, base))
                continue
            segment = flags[rest_start:start]
            width = segment.find(1)  # -1: no newline at all
            rows, rest = divmod(len(segment), width + 1) if width >= 0 else (0, 1)
            if rest or segment != _newline_pattern(width, rows):
                raise InputError(
                    "LLaVA-NeXT: an image's high-resolution rows are not one grid; the image tokens hold "
                    f"more than one image or a part of one. {SPLIT_MEDIA_HINT}"
                )
            blocks.append(_hires_block(rows, width, base))
        return blocks

    def check_media_inputs(self, call: dict) -> None:
        """The image placeholders must be what `image_sizes` asks for (before the model's own shape error)."""
        input_ids = call.get("input_ids")
        if call.get("pixel_values") is None or call.get("image_sizes") is None:
            return
        if not isinstance(input_ids, torch.Tensor):
            return
        needed, found = sum(self._counts_from_sizes(call)), int((input_ids == self.image_token_id).sum())
        if needed != found:
            raise InputError(
                f"{self.family}: the prompt holds {found} image tokens but image_sizes asks for {needed}; the images "
                "do not match the placeholders. Pass the processor's input_ids, pixel_values and image_sizes together"
            )

    def _blocks_from_sizes(self, call: dict, total: int, side: int) -> list[torch.Tensor] | None:
        """Every image's block from the call's `image_sizes` (the model's own grid helpers, once per size), or None
        when they cannot tell: no sizes, pre-encoded features, a subclass that counts otherwise, or a prompt whose
        image tokens are not all of the images (a chunk of a split prefill). The same blocks as the rows found from
        the newline embeddings (`image_blocks`), without comparing the embeddings (a device read on a GPU)."""
        if (call.get("image_sizes") is None or item_counts(call, "image") is not None
                or type(self)._counts_from_sizes is not LlavaNextAdapter._counts_from_sizes):  # fmt: skip
            return None
        grids = [self._anyres_grid(key) for key in _size_keys(call)]
        if sum(side * side + rows * (width + 1) for rows, width in grids) != total:
            return None
        base = _grid_block(0, side, side, t=0)
        return [_hires_block(rows, width, base) for rows, width in grids]

    def _split_image_runs(self, counts: list[int], is_newline: np.ndarray | None) -> list[int]:
        """Split blocks that hold several images of fixed size (none on LLaVA-NeXT: anyres images vary).

        is_newline: (N,) host bool, whether each image token of the call is the `image_newline` vector (None when
        the model has none)."""
        return counts

    def _counts_from_sizes(self, call: dict) -> list[int]:
        side = self._grid_side()
        return [side * side + rows * (width + 1) for rows, width in map(self._anyres_grid, _size_keys(call))]

    def _anyres_grid(self, size: tuple[int, ...]) -> tuple[int, int]:
        """(rows, width) of an image's high-resolution part, each row closed by a newline token: the model's own
        helpers, once per image size."""
        grid = self._grid_of_size.get(size)
        if grid is None:
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

            config, side = self.model.config, self._grid_side()
            pinpoints, tile = config.image_grid_pinpoints, config.vision_config.image_size
            num_h, num_w = get_anyres_image_grid_shape(size, pinpoints, tile)
            height, width = unpad_image(torch.zeros(1, num_h * side, num_w * side), torch.tensor(size)).shape[-2:]
            grid = self._grid_of_size[size] = (int(height), int(width))
        return grid

    def vision_attention_layer(self) -> nn.Module | None:
        return None  # anyres crops are packed after the tower; no per-token mapping yet

    def projector_rows(self, captured: list[torch.Tensor], call: dict) -> dict[str, torch.Tensor]:
        raise PruneError(
            "projector signals are not available on LLaVA-NeXT (anyres packs crops after the projector); "
            "use a method that does not need them"
        )

"""Inputs for the tiny VLMs of `vlm_prune.toy_models`: exactly what forward()/generate() take.

    inputs = make_inputs(model, batch=2, padding="left")
    alone = single_row(inputs, 1)      # row 1 without padding (== make_inputs(..., rows=[1]))

Placeholder counts, token ids and the video frame counts are those described in `toy_models`.
"""

from __future__ import annotations

import math

import torch

from vlm_prune.toy_models import (
    BOS_ID,
    IMAGE_ID,
    LLAVA_VIDEO_FAMILIES,
    LLAVA_VIDEO_FRAMES,
    PAD_ID,
    QWEN3_TIMESTAMP_TOKENS,
    QWEN_FAMILIES,
    TEXT_ID_MIN,
    TINY_VOCAB,
    VIDEO_FAMILIES,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    family_of,
)


def _llava_next_num_tokens(config, orig_hw: tuple[int, int], multi_image: bool = False) -> int:
    """Placeholder count of one LLaVA-NeXT (or LLaVA-OneVision) image, as the family's processor computes it.

    OneVision: an image of a multi-image prompt is its base grid plus one newline; otherwise the unpadded
    grid shrinks by `sqrt(h * w / (max_patches * side**2))` when that ratio exceeds 1.1 ("anyres_max_N").
    """
    from transformers.image_processing_utils import select_best_resolution

    size = config.vision_config.image_size
    patch = config.vision_config.patch_size
    orig_h, orig_w = orig_hw
    best_h, best_w = select_best_resolution([orig_h, orig_w], config.image_grid_pinpoints)
    scale_h, scale_w = best_h // size, best_w // size
    ph = pw = size // patch
    cur_h, cur_w = ph * scale_h, pw * scale_w
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    unpadded, newline = cur_h * cur_w, cur_h
    base = ph * pw  # CLS dropped ("default" strategy); SigLIP (OneVision) has none
    if config.model_type == "llava_onevision":
        if multi_image:
            return base + 1
        max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(cur_h * cur_w / (max_patches * ph**2))
        if ratio > 1.1:
            unpadded, newline = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return unpadded + newline + base


def _llava_video_tokens_per_frame(config) -> int:
    """Pooled tokens of one video frame: ceil(side / 2)^2 (OneVision's bilinear halving) or
    (side // spatial_pool_stride)^2 (NeXT-Video's pooling layer)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.model_type == "llava_onevision":
        return math.ceil(side / 2) ** 2
    return (side // config.spatial_pool_stride) ** 2


def _llava_next_num_patches(config, orig_hw: tuple[int, int], multi_image: bool = False) -> int:
    from transformers.image_processing_utils import select_best_resolution

    if multi_image and config.model_type == "llava_onevision":
        return 1

    size = config.vision_config.image_size
    best_h, best_w = select_best_resolution(list(orig_hw), config.image_grid_pinpoints)
    return 1 + (best_h // size) * (best_w // size)


def _row_spec(
    family: str,
    config,
    row: int,
    seed: int,
    num_images: int,
    video: bool,
    prompt_length: int | None,
    size: str,
    image_grid,
    video_grid,
    video_first: bool = False,
) -> dict:
    """Deterministic content of one row, a function of (seed, row) only.

    video_first: put the video before the images (the random draws stay in the same order, so the row holds
    the same media and text either way).
    """
    g = torch.Generator().manual_seed(seed * 7919 + row * 104729 + 17)
    vocab = config.text_config.vocab_size
    if prompt_length is None:
        prompt_length = 9 + 5 * row + int(torch.randint(0, 3, (1,), generator=g))
    prompt_length = max(int(prompt_length), 2)
    n_prefix = max(1, prompt_length // 3)
    text = torch.randint(TEXT_ID_MIN, vocab, (prompt_length,), generator=g)
    prefix, question = text[:n_prefix].tolist(), text[n_prefix:].tolist()

    image_ids: list[int] = []
    media: list[dict] = []
    tiny = size == "tiny"
    for k in range(num_images):
        if family == "llava":
            n = config.image_seq_length
            s = config.vision_config.image_size
            pix = torch.randn(3, s, s, generator=g)
            media.append(dict(kind="image", pixel=pix))
            image_ids += [IMAGE_ID] * n
        elif family in ("llava_next", *LLAVA_VIDEO_FAMILIES):
            s = config.vision_config.image_size
            # vary aspect ratio by row/image so anyres unpadding differs
            choices = [(s + s // 4, 2 * s - s // 4), (2 * s - s // 8, s + s // 2), (s, s), (2 * s, 2 * s)]
            if not tiny:
                choices = [(s, s), (2 * s - s // 4, 2 * s)]
            orig = choices[(row + k) % len(choices)]
            multi = num_images > 1
            n = _llava_next_num_tokens(config, orig, multi)
            n_patches = _llava_next_num_patches(config, orig, multi)
            pix = torch.randn(n_patches, 3, s, s, generator=g)
            media.append(dict(kind="image", pixel=pix, image_size=orig))
            image_ids += [IMAGE_ID] * n
        else:
            merge = config.vision_config.spatial_merge_size
            if image_grid is not None:
                gh, gw = image_grid
            elif tiny:
                gh, gw = [(6, 8), (8, 4), (4, 6)][(row + k) % 3]
            else:
                gh, gw = 48, 48
            tp = config.vision_config.temporal_patch_size
            p = config.vision_config.patch_size
            grid = (1, gh, gw)
            pix = torch.randn(gh * gw, 3 * tp * p * p, generator=g)
            media.append(dict(kind="image", pixel=pix, grid=grid))
            image_ids += [VISION_START_ID] + [IMAGE_ID] * (gh * gw // merge**2) + [VISION_END_ID]
        if k + 1 < num_images:
            image_ids += torch.randint(TEXT_ID_MIN, vocab, (2,), generator=g).tolist()
    video_ids: list[int] = []
    if video:
        video_ids = _video_spec(family, config, row, g, tiny, video_grid, media)
    media_ids = video_ids + image_ids if video_first else image_ids + video_ids
    if video_first:  # the items' order in the prompt: video, then images
        media = [m for m in media if m["kind"] == "video"] + [m for m in media if m["kind"] == "image"]
    return dict(ids=[BOS_ID] + prefix + media_ids + question, media=media)


def _video_spec(family: str, config, row: int, g: torch.Generator, tiny: bool, video_grid, media: list) -> list[int]:
    """Append one video of `family` to `media`; return its placeholder ids."""
    vocab = config.text_config.vocab_size
    if family in LLAVA_VIDEO_FAMILIES:
        s = config.vision_config.image_size
        frames = int(video_grid[0]) if video_grid is not None else LLAVA_VIDEO_FRAMES
        pix = torch.randn(frames, 3, s, s, generator=g)
        media.append(dict(kind="video", pixel=pix))
        newline = 1 if family == "llava_onevision" else 0
        return [VIDEO_ID] * (frames * _llava_video_tokens_per_frame(config) + newline)
    if family not in QWEN_FAMILIES:
        raise ValueError(f"toy video inputs are built for {VIDEO_FAMILIES}, not {family!r}")
    merge = config.vision_config.spatial_merge_size
    tp = config.vision_config.temporal_patch_size
    p = config.vision_config.patch_size
    if video_grid is not None:
        t, gh, gw = video_grid
    elif tiny:
        t, gh, gw = 2 + (row % 2), 4, 4
    else:
        t, gh, gw = 4, 24, 24
    pix = torch.randn(t * gh * gw, 3 * tp * p * p, generator=g)
    media.append(dict(kind="video", pixel=pix, grid=(t, gh, gw), second_per_grid=1.0))
    per_frame = gh * gw // merge**2
    ids: list[int] = []
    if family == "qwen3_vl":
        for _ in range(t):
            ids += torch.randint(TEXT_ID_MIN, vocab, (QWEN3_TIMESTAMP_TOKENS,), generator=g).tolist()
            ids += [VISION_START_ID] + [VIDEO_ID] * per_frame + [VISION_END_ID]
    else:
        ids += [VISION_START_ID] + [VIDEO_ID] * (t * per_frame) + [VISION_END_ID]
    return ids


def make_inputs(
    model,
    *,
    batch: int = 1,
    padding: str = "left",
    num_images: int | list[int] = 1,
    video: bool = False,
    prompt_lengths: list[int] | None = None,
    seed: int = 0,
    rows: list[int] | None = None,
    image_grid: tuple[int, int] | None = None,
    video_grid: tuple[int, int, int] | None = None,
    video_first: bool = False,
) -> dict:
    """The inputs forward()/generate() take for `batch` rows (or the given `rows` indices).

    Each row = [bos] + system prefix + media + question; row content depends on (seed, row index) only,
    so `make_inputs(m, rows=[i])` is row i of `make_inputs(m, batch=n)` without padding. Rows differ in
    text length (and, for LLaVA-NeXT/Qwen, in image size), so padding really happens.

    prompt_lengths: text tokens per row (prefix + question), indexed by row index.
    num_images: images per row, or a list indexed by row index (e.g. [0, 1]: row 0 text-only, row 1 one
        image). num_images=0 and video=False give a text-only input (no pixel keys).
    video: one video per row, after the images (`video_first=True`: before them); `VIDEO_FAMILIES` only.
    video_grid: (t, h, w) patch grid of every Qwen video; for the LLaVA video families only t (frames) is read.
    Returned keys: input_ids, attention_mask, and per family pixel_values (+ image_sizes for the LLaVA-NeXT
    families, + batch_num_images for OneVision, image_grid_thw + mm_token_type_ids for Qwen),
    pixel_values_videos (+ video_grid_thw for Qwen, + second_per_grid_ts for Qwen2.5-VL) for video.
    """
    if padding not in ("left", "right"):
        raise ValueError("padding must be 'left' or 'right'")
    family = family_of(model)
    config = model.config
    size = "tiny" if config.text_config.vocab_size == TINY_VOCAB else "bench"
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    row_ids = list(range(batch)) if rows is None else list(rows)
    specs = []
    for r in row_ids:
        pl = None if prompt_lengths is None else prompt_lengths[r]
        n_img = num_images if isinstance(num_images, int) else int(num_images[r])
        specs.append(
            _row_spec(family, config, r, seed, n_img, video, pl, size, image_grid, video_grid, video_first)
        )
    length = max(len(s["ids"]) for s in specs)
    input_ids = torch.full((len(specs), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(specs), length), dtype=torch.long)
    for b, s in enumerate(specs):
        n = len(s["ids"])
        sl = slice(length - n, length) if padding == "left" else slice(0, n)
        input_ids[b, sl] = torch.tensor(s["ids"])
        attention_mask[b, sl] = 1
    out: dict = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    images = [m for s in specs for m in s["media"] if m["kind"] == "image"]
    videos = [m for s in specs for m in s["media"] if m["kind"] == "video"]
    if family == "llava":
        if images:
            out["pixel_values"] = torch.stack([m["pixel"] for m in images]).to(device, dtype)
    elif family in ("llava_next", *LLAVA_VIDEO_FAMILIES):
        if images:
            max_p = max(m["pixel"].shape[0] for m in images)
            pix = torch.zeros(len(images), max_p, *images[0]["pixel"].shape[1:])
            for i, m in enumerate(images):
                pix[i, : m["pixel"].shape[0]] = m["pixel"]
            out["pixel_values"] = pix.to(device, dtype)
            out["image_sizes"] = torch.tensor([list(m["image_size"]) for m in images], dtype=torch.long, device=device)
            if family == "llava_onevision":
                per_row = [sum(m["kind"] == "image" for m in s["media"]) for s in specs]
                out["batch_num_images"] = torch.tensor(per_row, dtype=torch.long, device=device)
        if videos:
            out["pixel_values_videos"] = torch.stack([m["pixel"] for m in videos]).to(device, dtype)
    else:
        if images:
            out["pixel_values"] = torch.cat([m["pixel"] for m in images]).to(device, dtype)
            out["image_grid_thw"] = torch.tensor([m["grid"] for m in images], dtype=torch.long, device=device)
        if videos:
            out["pixel_values_videos"] = torch.cat([m["pixel"] for m in videos]).to(device, dtype)
            out["video_grid_thw"] = torch.tensor([m["grid"] for m in videos], dtype=torch.long, device=device)
            if family == "qwen2_5_vl":
                seconds = [m["second_per_grid"] for m in videos]
                out["second_per_grid_ts"] = torch.tensor(seconds, device=device)
        mm = torch.zeros_like(input_ids, dtype=torch.int32)
        mm[input_ids == IMAGE_ID] = 1
        mm[input_ids == VIDEO_ID] = 2
        out["mm_token_type_ids"] = mm.to(device)
    return out


def _media_per_row(inputs: dict, token_id: int) -> list[int]:
    """Number of media items of one kind per row: runs of its placeholder token outside padding."""
    ids = inputs["input_ids"]
    counts = []
    for row, valid in zip(ids, inputs["attention_mask"].bool(), strict=True):
        is_m = ((row == token_id) & valid).long()
        starts = ((is_m[1:] - is_m[:-1]) == 1).sum() + is_m[0]
        counts.append(int(starts))
    return counts


def single_row(inputs: dict, i: int) -> dict:
    """Row i of a batch from `make_inputs`, alone and without padding (media items sliced accordingly).

    Images per row are counted from the placeholder spans (rows may differ, e.g. num_images=[0, 1]);
    videos must be the same number per row (Qwen3-VL frames are separate spans, so the count comes from
    video_grid_thw).
    """
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool()
    batch = ids.shape[0]
    keep = mask[i]
    out = {"input_ids": ids[i][keep][None], "attention_mask": inputs["attention_mask"][i][keep][None]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i][keep][None]
    images = _media_per_row(inputs, IMAGE_ID)
    if "batch_num_images" in inputs:
        images = inputs["batch_num_images"].tolist()  # OneVision: multi-image bases are adjacent spans
    first, count = sum(images[:i]), images[i]
    if "pixel_values" in inputs and count:
        if "image_grid_thw" in inputs:
            grid = inputs["image_grid_thw"]
            sizes = grid.prod(-1).tolist()
            start = sum(sizes[:first])
            n = sum(sizes[first : first + count])
            out["pixel_values"] = inputs["pixel_values"][start : start + n]
            out["image_grid_thw"] = grid[first : first + count]
        else:
            out["pixel_values"] = inputs["pixel_values"][first : first + count]
            if "image_sizes" in inputs:
                out["image_sizes"] = inputs["image_sizes"][first : first + count]
                # drop the zero padding of the anyres patch dimension (random patches are never all zero)
                pv = out["pixel_values"]
                used = pv.flatten(2).ne(0).any(-1).any(0)
                n_used = int(used.nonzero().max()) + 1 if used.any() else pv.shape[1]
                out["pixel_values"] = pv[:, :n_used]
            if "batch_num_images" in inputs:
                out["batch_num_images"] = inputs["batch_num_images"][i : i + 1]
    if "pixel_values_videos" in inputs and "video_grid_thw" not in inputs:  # LLaVA video families
        per = inputs["pixel_values_videos"].shape[0] // batch
        out["pixel_values_videos"] = inputs["pixel_values_videos"][i * per : (i + 1) * per]
    elif "pixel_values_videos" in inputs:
        grid = inputs["video_grid_thw"]
        per = grid.shape[0] // batch
        sizes = grid.prod(-1).tolist()
        start = sum(sizes[: i * per])
        n = sum(sizes[i * per : (i + 1) * per])
        out["pixel_values_videos"] = inputs["pixel_values_videos"][start : start + n]
        out["video_grid_thw"] = grid[i * per : (i + 1) * per]
        if "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][i * per : (i + 1) * per]
    return out


def num_visual_tokens(inputs: dict) -> torch.Tensor:
    """(B,) number of image+video placeholder tokens per row."""
    ids = inputs["input_ids"]
    return ((ids == IMAGE_ID) | (ids == VIDEO_ID)).sum(-1)

"""Tiny random-weight VLMs built from transformers configs, and inputs for them.

Used by the tests and the speed benchmarks; nothing here downloads anything.

    model = build_tiny("qwen2_vl")                       # eval(), deterministic given `seed`
    inputs = make_inputs(model, batch=2, padding="left")  # exactly what forward()/generate() take
    alone = single_row(inputs, 1)      # row 1 without padding (== make_inputs(..., rows=[1]))

Families: "llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"
(see `FAMILIES`; `VIDEO_FAMILIES` take `make_inputs(..., video=True)`).

Token ids (all families): pad 0, bos 1, eos 2, image 3, video 4, vision_start 5, vision_end 6; ordinary
text tokens are drawn from [TEXT_ID_MIN, vocab). The lm_head rows of the special ids are zeroed, so
greedy decoding of a random model never emits them (no early EOS, no stray media placeholder).

Placeholder counts follow the processors: LLaVA one token per patch (CLS dropped), LLaVA-NeXT anyres
base + unpadded crops + one newline token per row, Qwen `t*h*w / merge**2` per image/video (Qwen3-VL:
per frame, each frame wrapped in vision_start/end and preceded by timestamp text tokens). LLaVA-OneVision:
images as LLaVA-NeXT (anyres_max_2 here, so that the interpolated branch runs too; base + one newline for each
image of a multi-image prompt), video `frames * ceil(side / 2) ** 2 + 1` (the trailing newline). LLaVA-NeXT-Video:
images as LLaVA-NeXT, video `frames * (side // spatial_pool_stride) ** 2`. LLaVA video families take one frame
count per call (their pixel_values_videos is one (videos, frames, 3, H, W) tensor).
"""

from __future__ import annotations

import math

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 3, 4, 5, 6
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID)
TEXT_ID_MIN = 10
TINY_VOCAB = 300

FAMILIES = ("llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
LLAVA_VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")
#: families whose toy inputs can hold video (with or without images in the same prompt)
VIDEO_FAMILIES = LLAVA_VIDEO_FAMILIES + QWEN_FAMILIES
#: frames per video of the LLaVA video families in the toy inputs (one count per call; see the module docstring)
LLAVA_VIDEO_FRAMES = 3

# Number of timestamp text tokens Qwen3-VL puts before every video frame ("<0.5 seconds>").
QWEN3_TIMESTAMP_TOKENS = 3


def available_families() -> list[str]:
    """The families whose model classes this transformers install provides."""
    out = []
    for family in FAMILIES:
        try:
            _classes(family)
        except ImportError:
            continue
        out.append(family)
    return out


def _classes(family: str):
    import transformers as tf

    if family == "llava":
        return tf.LlavaConfig, tf.LlavaForConditionalGeneration
    if family == "llava_next":
        return tf.LlavaNextConfig, tf.LlavaNextForConditionalGeneration
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig, tf.LlavaOnevisionForConditionalGeneration
    if family == "llava_next_video":
        return tf.LlavaNextVideoConfig, tf.LlavaNextVideoForConditionalGeneration
    if family == "qwen2_vl":
        return tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
    if family == "qwen3_vl":
        return tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
    raise ValueError(f"unknown toy family {family!r}; choose one of {FAMILIES}")


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------


def _text_dims(size: str) -> dict:
    if size == "tiny":
        return dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    if size == "bench":
        # ~100M parameters: 12 x 6.3M decoder layers + 2 x 12.3M embeddings/lm_head.
        return dict(
            vocab_size=16000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
        )
    raise ValueError(f"size must be 'tiny' or 'bench', got {size!r}")


def _common_text(size: str) -> dict:
    d = _text_dims(size)
    d.update(
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return d


def _llava_config(family: str, size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

    config_cls, _ = _classes(family)
    tiny = size == "tiny"
    onevision = family == "llava_onevision"
    vision_dims = dict(
        hidden_size=32 if tiny else 256,
        intermediate_size=64 if tiny else 1024,
        num_hidden_layers=2 if tiny else 4,
        num_attention_heads=2 if tiny else 4,
        # OneVision: an odd patch grid (5x5), so that its ceil(side / 2) video pooling differs from floor
        image_size=(40 if onevision else 32) if tiny else 336,
        patch_size=8 if tiny else 14,
    )
    if onevision:  # SigLIP (no CLS token) and a Qwen2 LLM, as the released checkpoints
        vision = SiglipVisionConfig(**vision_dims)
        text = Qwen2Config(**_common_text(size))
    else:
        vision = CLIPVisionConfig(projection_dim=32 if tiny else 256, **vision_dims)
        text = LlamaConfig(**_common_text(size))
    kwargs = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy="full" if onevision else "default",
        vision_feature_layer=-1 if onevision else -2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    side = vision.image_size // vision.patch_size
    if family == "llava":
        kwargs["image_seq_length"] = side * side
    else:
        s = vision.image_size
        kwargs["image_grid_pinpoints"] = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        kwargs["image_seq_length"] = side * side
    if family in LLAVA_VIDEO_FAMILIES:
        kwargs["video_token_index"] = VIDEO_ID
    if onevision:
        kwargs["vision_aspect_ratio"] = "anyres_max_2"  # tiny grids reach both the plain and the interpolated branch
    if family == "llava_next_video":
        kwargs.update(spatial_pool_mode="average", spatial_pool_stride=2, video_seq_length=(side // 2) ** 2)
    return config_cls(**kwargs)


def _qwen_config(family: str, size: str):
    config_cls, _ = _classes(family)
    tiny = size == "tiny"
    text = _common_text(size)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    if family == "qwen3_vl":
        # interleaved M-RoPE, as Qwen3-VL's [24, 20, 20] for head_dim 128
        hw = (half * 5) // 16
        section = [half - 2 * hw, hw, hw]
        rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section, "mrope_interleaved": True}
        text["head_dim"] = head_dim
    else:
        # chunked M-RoPE, as Qwen2-VL's [16, 24, 24] for head_dim 128
        t = half // 4
        h = (half - t) // 2
        section = [t, h, half - t - h]
        rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}
    text["rope_parameters"] = rope
    hidden = text["hidden_size"]
    patch = 4 if tiny else 14
    # every Qwen vision tower: 2x2 spatial merge of patches, 2 frames per temporal patch
    patches = dict(num_heads=2 if tiny else 4, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = dict(depth=2 if tiny else 4, embed_dim=32 if tiny else 256, hidden_size=hidden, mlp_ratio=2, **patches)
    else:
        # Qwen2.5-VL and Qwen3-VL: a SwiGLU tower whose merger projects to the text width
        vision = dict(
            hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 1024, out_hidden_size=hidden, **patches
        )
        if family == "qwen2_5_vl":
            vision.update(
                depth=2 if tiny else 4,
                window_size=patch * 2 * 2,
                fullatt_block_indexes=[1] if tiny else [1, 3],
                tokens_per_second=2,
            )
        else:
            vision.update(
                depth=3 if tiny else 4,
                num_position_embeddings=64 if tiny else 2304,
                deepstack_visual_indexes=[0, 1, 2] if tiny else [1, 2, 3],
            )
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )


def build_config(family: str, size: str = "tiny"):
    """The config `build_tiny` uses (no weights)."""
    if family in ("llava", "llava_next", *LLAVA_VIDEO_FAMILIES):
        return _llava_config(family, size)
    if family in QWEN_FAMILIES:
        return _qwen_config(family, size)
    raise ValueError(f"unknown toy family {family!r}; choose one of {FAMILIES}")


def build_tiny(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    size: str = "tiny",
    dtype: torch.dtype = torch.float32,
):
    """A random-weight model of `family`, in eval mode, identical for the same `seed`.

    size="tiny": 4 decoder layers, hidden 64, GQA 4/2 heads, vocab 300, a handful of visual tokens.
    size="bench": a ~100M-parameter LLM; LLaVA yields 576 visual tokens per 336px image (patch 14),
    Qwen a 48x48 patch grid by default (576 tokens after the 2x2 merge; `make_inputs(image_grid=...)`).
    """
    _, model_cls = _classes(family)
    config = build_config(family, size)
    config._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        sub_config = getattr(config, sub, None)
        if sub_config is not None:
            sub_config._attn_implementation = attn_implementation
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(state)
    # Random init in transformers is not always fully seeded (some modules draw in post_init order that
    # depends on the class); re-draw every parameter from our own generator to be safe and deterministic.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or name.endswith("ln.weight")):
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
                continue
            std = 0.02 if size == "bench" else 0.1
            if "embed_tokens" in name:
                std = 1.0 if size == "tiny" else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        lm_head = model.get_output_embeddings()
        lm_head.weight[list(SPECIAL_IDS)] = 0.0
    model = model.to(dtype)
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def family_of(model) -> str:
    mt = model.config.model_type
    return {
        "llava": "llava",
        "llava_next": "llava_next",
        "llava_onevision": "llava_onevision",
        "llava_next_video": "llava_next_video",
        "qwen2_vl": "qwen2_vl",
        "qwen2_5_vl": "qwen2_5_vl",
        "qwen3_vl": "qwen3_vl",
    }[mt]


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------


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

"""Tiny random-weight VLMs built from transformers configs (their inputs: `vlm_prune.toy_inputs`).

Used by the tests and the speed benchmarks; nothing here downloads anything. `make_inputs`, `single_row` and
`num_visual_tokens` live in `toy_inputs` and are importable from here too (`__getattr__`).

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


_INPUTS = ("make_inputs", "single_row", "num_visual_tokens")


def __getattr__(name: str):
    """`make_inputs`, `single_row` and `num_visual_tokens` from `toy_inputs` (imported on first use: it imports
    this module's ids and families)."""
    if name in _INPUTS:
        from vlm_prune import toy_inputs

        return getattr(toy_inputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

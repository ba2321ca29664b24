"""A random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint folder that vLLM and transformers both load, offline.

Used by tests/test_vllm_engine.py and benchmarks/vllm_serving.py. Nothing is downloaded: the tokenizer is a byte-level
BPE trained here on a small generated corpus (with Qwen's special tokens at ids 0..6), the processor is
transformers' `Qwen2_5_VLProcessor` written with `save_pretrained`, and the weights are drawn from a seeded
generator (as `vlm_prune.toy_models.build_tiny`: norms 1, the special tokens' lm_head rows zeroed so greedy decoding
never emits them). vLLM's CPU attention needs head_dim >= 32, so the text model is wider than the toy models.

    folder = build_checkpoint("/tmp/tiny_qwen25vl", size="tiny")   # ~1 MB of weights
    folder = build_checkpoint("/tmp/bench_qwen25vl", size="bench") # ~100M parameters (the serving benchmark)
    folder = build_checkpoint("/tmp/tiny_qwen3vl", family="qwen3_vl")  # deepstack tower, interleaved M-RoPE

Families (`FAMILIES`): "qwen2_5_vl" (default), "qwen2_vl" (the Qwen2-VL tower: LayerNorm blocks, no windows) and
"qwen3_vl" (deepstack at every tower block of the tiny size, interleaved M-RoPE, timestamps before video frames).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(len(SPECIAL_TOKENS))
_WORDS = "the a what colour shape is in image video left right top bottom red green blue circle square moves".split()

SIZES = {
    # text: vLLM's CPU attention supports head_dim 32, 64, 80, ...
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320),
                 vision=dict(hidden_size=32, intermediate_size=64, depth=2, num_heads=2, patch_size=4,
                             fullatt_block_indexes=[1]),
                 std=0.1, embed_std=1.0),
    # ~100M parameters: 12 x 6.3M decoder layers + 2 x 12.3M embeddings / lm_head, a 4-block 256-wide tower
    "bench": dict(text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=4, vocab_size=16000),
                  vision=dict(hidden_size=256, intermediate_size=1024, depth=4, num_heads=4, patch_size=14,
                              fullatt_block_indexes=[1, 3]),
                  std=0.02, embed_std=0.02),
}


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE (`PreTrainedTokenizerFast`) with `SPECIAL_TOKENS` at ids 0..6, trained on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) + f" {rng.randint(0, 99)}.{rng.randint(0, 9)} seconds"
              for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    assert fast.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    return fast


FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
#: family -> (config class, model class, processor class) names in transformers
_CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}


def _family(family: str) -> tuple[type, type, type]:
    import transformers

    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return tuple(getattr(transformers, name) for name in _CLASSES[family])  # type: ignore[return-value]


def build_config(size: str = "tiny", family: str = "qwen2_5_vl"):
    config_cls, _, _ = _family(family)
    dims = SIZES[size]
    text = dict(dims["text"])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    if family == "qwen3_vl":  # interleaved M-RoPE, as Qwen3-VL's [24, 20, 20] for head_dim 128
        hw = (half * 5) // 16
        rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [half - 2 * hw, hw, hw],
                "mrope_interleaved": True}
        text["head_dim"] = head_dim
    else:
        t = half // 4
        h = (half - t) // 2
        rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [t, h, half - t - h]}
    text.update(
        pad_token_id=PAD, bos_token_id=IM_START, eos_token_id=IM_END, max_position_embeddings=4096,
        tie_word_embeddings=False, rope_parameters=rope,
    )
    vision = dict(dims["vision"])
    patch = vision["patch_size"]
    vision.update(spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        vision.update(out_hidden_size=text["hidden_size"], window_size=patch * 2 * 2, tokens_per_second=2)
    elif family == "qwen2_vl":
        vision = dict(depth=vision["depth"], embed_dim=vision["hidden_size"], hidden_size=text["hidden_size"],
                      mlp_ratio=2, num_heads=vision["num_heads"], patch_size=patch, spatial_merge_size=2,
                      temporal_patch_size=2)
    else:
        vision.pop("fullatt_block_indexes")
        depth = vision["depth"]
        vision.update(out_hidden_size=text["hidden_size"], num_position_embeddings=64 if size == "tiny" else 2304,
                      deepstack_visual_indexes=list(range(depth)) if size == "tiny" else [1, 2, 3])
    return config_cls(
        text_config=text, vision_config=vision, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )


def build_processor(tokenizer, patch_size: int, family: str = "qwen2_5_vl"):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    processor_cls = _family(family)[2]
    factor = patch_size * 2
    size = {"shortest_edge": factor * factor, "longest_edge": 16384 * factor * factor}  # Qwen's default max_pixels
    # one normalisation for images and video (real Qwen3-VL checkpoints use 0.5 for both; vLLM normalises in the
    # model with one mean and std for both kinds)
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if family == "qwen3_vl" else {}
    image = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size, **norm)
    video_cls = Qwen3VLVideoProcessor if family == "qwen3_vl" else Qwen2VLVideoProcessor
    video = video_cls(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size)
    return processor_cls(image_processor=image, video_processor=video, tokenizer=tokenizer)


def build_checkpoint(folder: str | Path, size: str = "tiny", seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Write config, weights (float32), tokenizer and processor to `folder` (reused when already complete)."""
    folder = Path(folder)
    marker = folder / "vlm_prune_checkpoint.json"
    stamp = {"size": size, "seed": seed, "version": 2}
    if family != "qwen2_5_vl":
        stamp |= {"family": family, "processor": 2}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dims = SIZES[size]
    config = build_config(size, family)
    model_cls = _family(family)[1]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(state)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name.lower():
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            std = dims["embed_std"] if "embed_tokens" in name else dims["std"]
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        model.get_output_embeddings().weight[: len(SPECIAL_TOKENS)] = 0.0
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = IM_END
    model.save_pretrained(folder)
    tokenizer = train_tokenizer(min(dims["text"]["vocab_size"], 320), seed)
    build_processor(tokenizer, dims["vision"]["patch_size"], family).save_pretrained(folder)
    marker.write_text(json.dumps(stamp))
    return folder


def video_input(frames: torch.Tensor | object, fps: float = 2.0):
    """(frames (T, H, W, 3) uint8 numpy, metadata) as vLLM takes a pre-sampled video (no frame sampling)."""
    count = len(frames)
    metadata = {
        "fps": fps,
        "duration": count / fps,
        "total_num_frames": count,
        "frames_indices": list(range(count)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return frames, metadata

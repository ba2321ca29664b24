"""Convert a released LLaVA-3D checkpoint (ChaimZhu/LLaVA-3D-7B, the authors' `LlavaLlamaForCausalLM` layout)
into a `Llava3DForConditionalGeneration` folder that `AutoModelForImageTextToText.from_pretrained` loads.

    python -m vlm_prune.models.llava3d.convert SRC OUT [--clip CLIP_FOLDER] [--dtype float16]

SRC: a local folder with the authors' config.json (model_type "llava_llama"), *.safetensors or
pytorch_model*.bin weights and, optionally, the tokenizer. Nothing is downloaded: when SRC holds no vision-tower
weights (LLaVA checkpoints often load CLIP by name, `mm_vision_tower`), pass --clip with a local
CLIPVisionModel folder (openai/clip-vit-large-patch14-336); --clip also gives the vision config (default: the
CLIP ViT-L/14-336 shape when `mm_vision_tower` names it).

Key layout (authors -> here):
    model.embed_tokens / model.layers.* / model.norm       -> model.language_model.*
    lm_head                                                -> lm_head
    model.mm_projector.0 / .2                              -> model.multi_modal_projector.linear_1 / linear_2
    model.vision_tower.vision_tower.vision_model.*         -> model.vision_tower.*
    model.video_tower.video_tower.positional_embedding.position_embedding_head.{0,1,3}
                                                           -> model.position_embedding.head.{0,1,3}
    model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head.{0,1,3}
                                                           -> model.prompt_encoder.head.{0,1,3}
Dropped: rotary `inv_freq` buffers, `image_newline` (only used by the authors' unused "unpad" merge).

Placeholders: the authors splice at ids -200 (<image>) and -300 (<boxes>) that no vocabulary holds. Here they are
real tokens: if the tokenizer lacks "<image>" / "<boxes>" they are added and the embedding and lm_head grow by
those rows (set to the mean row, as llava-hf's conversion does), so `image_token_id` / `click_token_id` are the
new ids.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch

from vlm_prune.errors import InputError

_RULES: list[tuple[str, str]] = [
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (
        r"^model\.video_tower\.video_tower\.positional_embedding\.position_embedding_head\.",
        "model.position_embedding.head.",
    ),
    (r"^model\.video_tower\.prompt_encoder\.pos_emb3d\.position_embedding_head\.", "model.prompt_encoder.head."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.", "lm_head."),
]
_DROP = (re.compile(r"rotary_emb\.inv_freq$"), re.compile(r"^model\.image_newline$"))
CLIP_L336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "initializer_range",
)


def rename_key(key: str) -> str | None:
    """The key in this package's layout, or None for a key that is dropped; KeyError for an unknown key."""
    if any(pattern.search(key) for pattern in _DROP):
        return None
    for pattern, replacement in _RULES:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(key)


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(renamed state dict, dropped keys). Raises InputError listing keys this converter does not know."""
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        try:
            new = rename_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    if unknown:
        raise InputError(
            f"{len(unknown)} checkpoint keys are not in the LLaVA-3D layout (first: {unknown[:5]}); is SRC a "
            "LLaVA-3D (LlavaLlamaForCausalLM + SpatialAwareModule) checkpoint?"
        )
    return out, dropped


def config_from_source(source: dict, vision: dict | None, image_token_id: int, click_token_id: int, vocab_size: int):
    """A `Llava3DConfig` from the authors' config.json dict and a CLIP vision config dict (None: CLIP-L/14-336)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from vlm_prune.models.llava3d.configuration import Llava3DConfig

    if vision is None:
        tower = str(source.get("mm_vision_tower", ""))
        if "clip-vit-large-patch14-336" not in tower:
            raise InputError(
                f"the checkpoint's vision tower is {tower!r}, whose shape this converter does not know; pass --clip "
                "with a local CLIPVisionModel folder"
            )
        vision = dict(CLIP_L336)
    vision = {k: v for k, v in vision.items() if k not in ("architectures", "model_type", "transformers_version")}
    text = {field: source[field] for field in TEXT_FIELDS if field in source}
    text["vocab_size"] = vocab_size
    text.setdefault("tie_word_embeddings", False)
    feature = source.get("mm_vision_select_feature", "patch")
    return Llava3DConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_id,
        click_token_id=click_token_id,
        vision_feature_layer=int(source.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="full" if feature == "cls_patch" else "default",
        projector_hidden_act="gelu",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=bool(text["tie_word_embeddings"]),
    )


def _load_weights(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for path in files:
            state.update(load_file(path))
        return state
    files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        raise InputError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _grow_vocab(state: dict[str, torch.Tensor], rows: int) -> None:
    """Append `rows` mean rows to the embedding and lm_head (new placeholder tokens)."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state and rows:
            weight = state[key]
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            state[key] = torch.cat([weight, mean.expand(rows, -1)])


def convert(src: str, out: str, clip: str | None = None, dtype: str | None = None) -> str:
    """Convert SRC into OUT (model, config, and tokenizer + Llava3DProcessor settings when SRC has a tokenizer)."""
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration
    from vlm_prune.models.llava3d.processing import Llava3DProcessor

    with open(os.path.join(src, "config.json")) as handle:
        source = json.load(handle)
    state, dropped = convert_state_dict(_load_weights(src))
    vision = None
    if clip is not None:
        with open(os.path.join(clip, "config.json")) as handle:
            vision = json.load(handle)
        vision = vision.get("vision_config", vision)
        if not any(key.startswith("model.vision_tower.") for key in state):
            for key, value in _load_weights(clip).items():
                key = re.sub(r"^(vision_model\.)", "", key)
                if not key.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale")):
                    state[f"model.vision_tower.{key}"] = value
    if not any(key.startswith("model.vision_tower.") for key in state):
        raise InputError("SRC holds no vision-tower weights; pass --clip with a local CLIPVisionModel folder")
    vocab = int(state["model.language_model.embed_tokens.weight"].shape[0])
    tokenizer = None
    if glob.glob(os.path.join(src, "tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
        missing = [t for t in ("<image>", "<boxes>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        image_id, click_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<boxes>")
        new_vocab = max(vocab, len(tokenizer))
    else:
        image_id, click_id, new_vocab = vocab, vocab + 1, vocab + 2
    _grow_vocab(state, new_vocab - vocab)
    config = config_from_source(source, vision, image_id, click_id, new_vocab)
    with torch.device("meta"):
        model = Llava3DForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing_keys = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing_keys or extra:
        raise InputError(
            f"the converted weights do not fit the model: missing {missing_keys[:5]} ({len(missing_keys)}), unexpected "
            f"{extra[:5]} ({len(extra)}); check --clip and that SRC is a LLaVA-3D checkpoint"
        )
    target = getattr(torch, dtype) if dtype else None
    if target is not None:
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _save(config, state, out)
    if tokenizer is not None:
        Llava3DProcessor.for_model(config, tokenizer).save_pretrained(out)
    if dropped:
        print(f"dropped {len(dropped)} keys: {dropped[:4]}{' ...' if len(dropped) > 4 else ''}", file=sys.stderr)
    return out


def _save(config, state: dict[str, torch.Tensor], out: str) -> None:
    """config.json, generation_config.json and model.safetensors (what from_pretrained reads), without building
    the model in memory (a 7B checkpoint would need it twice)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    config.architectures = ["Llava3DForConditionalGeneration"]
    config.save_pretrained(out)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)\
        .save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_prune.models.llava3d.convert",
        description="Convert a released LLaVA-3D checkpoint (ChaimZhu/LLaVA-3D-7B layout) into a transformers-5 "
        "Llava3DForConditionalGeneration folder. Offline: SRC (and --clip) are local folders.",
    )
    parser.add_argument("src", help="folder with the authors' config.json and weights (and tokenizer)")
    parser.add_argument("out", help="output folder (AutoModelForImageTextToText.from_pretrained(out) loads it)")
    parser.add_argument("--clip", help="local CLIPVisionModel folder: vision config, and weights if SRC lacks them")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="cast the weights")
    args = parser.parse_args(argv)
    convert(args.src, args.out, clip=args.clip, dtype=args.dtype)
    print(f"wrote {args.out}; load it with: import vlm_prune.models.llava3d; "
          f"AutoModelForImageTextToText.from_pretrained({args.out!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Convert LISA's released checkpoints (LISA-7B-v1: LLaVA on Llama-2, SAM ViT-H, `text_hidden_fcs`) to `Segmenter`.

    python -m vlm_prune.models.segmenter_convert LISA_DIR OUT_DIR [--seg-token-id N] [--image-token-id N]

LISA_DIR holds LISA's `config.json` and its weights (`*.safetensors` or `pytorch_model*.bin`); OUT_DIR then loads
with `Segmenter.from_pretrained(OUT_DIR)`. The tokenizer is LISA's own (copy it beside the VLM); `[SEG]` and the
image placeholder are read from its `added_tokens.json` when present, else pass them.

Key layouts (LISA: `model/LISA.py` of github.com/dvlab-research/LISA, `LISAForCausalLM` = LLaVA's
`LlavaLlamaForCausalLM` whose `model` also holds `visual_model` (SAM) and `text_hidden_fcs`):

    model.embed_tokens / model.layers.* / model.norm     -> vlm.model.language_model.*
    lm_head                                              -> vlm.lm_head
    model.mm_projector (one Linear, LLaVA v1)            -> vlm.model.multi_modal_projector.linear_1, with an
                                                            identity linear_2 and projector_hidden_act="linear"
    model.mm_projector.0 / .2 (LLaVA-1.5 mlp2x_gelu)     -> linear_1 / linear_2
    model.vision_tower.vision_tower.vision_model.*       -> vlm.model.vision_tower.*
    model.visual_model.* (segment-anything's names)      -> sam.* (transformers' SamModel names; the correspondence
                                                            is the one transformers' convert_sam_to_hf.py uses)
    model.text_hidden_fcs.0.0 / .0.2                     -> text_hidden_fcs.0 / .2

`lisa_to_ours` and `ours_to_lisa` are inverse on these keys (tested on a synthetic state dict).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from vlm_prune.errors import PruneError

# segment-anything -> transformers SamModel, applied in order (plain substring replacements)
_SAM_FORWARD = [
    ("image_encoder.blocks.", "vision_encoder.layers."),
    ("image_encoder.", "vision_encoder."),
    ("patch_embed.proj.", "patch_embed.projection."),
    ("neck.0.", "neck.conv1."),
    ("neck.1.", "neck.layer_norm1."),
    ("neck.2.", "neck.conv2."),
    ("neck.3.", "neck.layer_norm2."),
    ("mask_downscaling.0.", "mask_embed.conv1."),
    ("mask_downscaling.1.", "mask_embed.layer_norm1."),
    ("mask_downscaling.3.", "mask_embed.conv2."),
    ("mask_downscaling.4.", "mask_embed.layer_norm2."),
    ("mask_downscaling.6.", "mask_embed.conv3."),
    ("output_upscaling.0.", "upscale_conv1."),
    ("output_upscaling.1.", "upscale_layer_norm."),
    ("output_upscaling.3.", "upscale_conv2."),
    ("norm_final_attn.", "layer_norm_final_attn."),
    ("point_embeddings.", "point_embed."),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
]
# transformers -> segment-anything: the same pairs, ordered so that no rule matches another's output
_SAM_REVERSE = [(new, old) for old, new in _SAM_FORWARD[:2]] + [
    (new, old) for old, new in _SAM_FORWARD[2:] if old != "point_embeddings."
] + [("encoder.point_embed.", "encoder.point_embeddings.")]
_NORM = re.compile(r"\.norm(\d)\.")
_HEAD = re.compile(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.")
_HEAD_OURS = re.compile(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.(proj_in|proj_out|layers\.(\d+))\.")
_SAM_DROPPED = ("pixel_mean", "pixel_std")
_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"


def _replace_all(key: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        key = key.replace(old, new)
    return key


def sam_key_to_ours(key: str, head_depths: dict[str, int]) -> str:
    """A segment-anything key -> transformers' SamModel key. head_depths: layers of each MLP head (3 in SAM)."""
    key = _NORM.sub(r".layer_norm\1.", _replace_all(key, _SAM_FORWARD))

    def head(match: re.Match) -> str:
        index, depth = int(match.group(2)), head_depths["iou" if "iou" in match.group(1) else "hyper"]
        name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        return f"{match.group(1)}.{name}."

    return _HEAD.sub(head, key)


def sam_key_to_lisa(key: str, head_depths: dict[str, int]) -> str:
    """The inverse of `sam_key_to_ours`."""

    def head(match: re.Match) -> str:
        depth = head_depths["iou" if "iou" in match.group(1) else "hyper"]
        name = match.group(2)
        index = 0 if name == "proj_in" else depth - 1 if name == "proj_out" else int(match.group(3)) + 1
        return f"{match.group(1)}.layers.{index}."

    key = _replace_all(_HEAD_OURS.sub(head, key), _SAM_REVERSE)
    return re.sub(r"\.layer_norm(\d)\.", r".norm\1.", key)


def _vlm_rules() -> list[tuple[re.Pattern, str]]:
    return [
        (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vlm.model.vision_tower."),
        (re.compile(r"^model\.mm_projector\.0\."), "vlm.model.multi_modal_projector.linear_1."),
        (re.compile(r"^model\.mm_projector\.2\."), "vlm.model.multi_modal_projector.linear_2."),
        (re.compile(r"^model\.mm_projector\."), "vlm.model.multi_modal_projector.linear_1."),
        (re.compile(r"^model\.text_hidden_fcs\.0\.(\d)\."), r"text_hidden_fcs.\1."),
        (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"vlm.model.language_model.\1."),
        (re.compile(r"^lm_head\."), "vlm.lm_head."),
    ]


def lisa_to_ours(state: dict[str, torch.Tensor], head_depths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """LISA's state dict -> the `Segmenter` state dict (see the module docstring). Unknown keys are an error."""
    head_depths = head_depths or {"iou": 3, "hyper": 3}
    out: dict[str, torch.Tensor] = {}
    linear_projector = "model.mm_projector.weight" in state
    for key, value in state.items():
        if key.startswith("model.visual_model."):
            sam_key = key[len("model.visual_model.") :]
            if sam_key in _SAM_DROPPED:
                continue
            ours = "sam." + sam_key_to_ours(sam_key, head_depths)
            out[ours] = value
            if ours == "sam." + _POSITIONAL:
                out["sam.shared_image_embedding.positional_embedding"] = value
            continue
        for pattern, replacement in _vlm_rules():
            if pattern.search(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            raise PruneError(f"LISA key {key!r} has no place in the segmenter; is this a LISA checkpoint?")
    if linear_projector:
        width = state["model.mm_projector.weight"].shape[0]
        weight = state["model.mm_projector.weight"]
        out["vlm.model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=weight.dtype)
        out["vlm.model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=weight.dtype)
    return out


def ours_to_lisa(state: dict[str, torch.Tensor], head_depths: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The inverse of `lisa_to_ours` (an identity `linear_2` with the "linear" activation folds back to LISA's
    single-Linear projector)."""
    head_depths = head_depths or {"iou": 3, "hyper": 3}
    linear_2 = state.get("vlm.model.multi_modal_projector.linear_2.weight")
    single = linear_2 is not None and torch.equal(linear_2, torch.eye(linear_2.shape[0], dtype=linear_2.dtype))
    single = single and not bool(state["vlm.model.multi_modal_projector.linear_2.bias"].any())
    rules: list[tuple[str, Callable[[str], str]]] = [
        ("sam.", lambda k: "model.visual_model." + sam_key_to_lisa(k, head_depths)),
        ("vlm.model.vision_tower.", lambda k: "model.vision_tower.vision_tower.vision_model." + k),
        ("vlm.model.multi_modal_projector.linear_1.", lambda k: "model.mm_projector." + ("" if single else "0.") + k),
        ("vlm.model.multi_modal_projector.linear_2.", lambda k: "model.mm_projector.2." + k),
        ("vlm.model.language_model.", lambda k: "model." + k),
        ("vlm.lm_head.", lambda k: "lm_head." + k),
        ("text_hidden_fcs.", lambda k: "model.text_hidden_fcs.0." + k),
    ]
    out = {}
    for key, value in state.items():
        if key == "sam.shared_image_embedding.positional_embedding":
            continue
        if single and key.startswith("vlm.model.multi_modal_projector.linear_2."):
            continue
        for prefix, rename in rules:
            if key.startswith(prefix):
                out[rename(key[len(prefix) :])] = value
                break
        else:
            raise PruneError(f"segmenter key {key!r} has no LISA counterpart")
    return out


# ------------------------------------------------------------------------------------------ configs and files
def configs_from_lisa(lisa_config: dict, seg_token_id: int, image_token_id: int, single_linear: bool):
    """(LlavaConfig, SamConfig, SegmenterConfig) for a LISA `config.json` (LLaVA-Llama fields, SAM ViT-H unless
    it carries a `sam_config` dict of SamConfig fields, as our tiny test configs do)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SamConfig

    from vlm_prune.models.segmenter import SegmenterConfig

    text_fields = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta",
    )  # fmt: skip
    text = LlamaConfig(**{k: lisa_config[k] for k in text_fields if k in lisa_config}, tie_word_embeddings=False)
    vision = lisa_config.get("vision_config") or dict(  # openai/clip-vit-large-patch14, LISA's vision tower
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768,
    )  # fmt: skip
    vision = CLIPVisionConfig(**vision)
    side = vision.image_size // vision.patch_size
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=lisa_config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",  # LISA: mm_vision_select_feature "patch" (no CLS)
        projector_hidden_act="linear" if single_linear else "gelu",
        image_seq_length=side * side,
        tie_word_embeddings=False,
    )
    sam = SamConfig(**lisa_config["sam_config"]) if "sam_config" in lisa_config else _sam_vit_h()
    seg = SegmenterConfig(seg_token_id=seg_token_id, seg_hidden_offset=-1)
    return llava, sam, seg


def _sam_vit_h():
    from transformers import SamConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                             global_attn_indexes=[7, 15, 23, 31])  # fmt: skip
    return SamConfig(vision_config=vision)


def load_lisa_state(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for path in files:
            state.update(load_file(str(path)))
        return state
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise PruneError(f"{directory} holds no *.safetensors or pytorch_model*.bin weights")
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _added_token(directory: Path, token: str) -> int | None:
    path = directory / "added_tokens.json"
    if path.exists():
        value = json.loads(path.read_text()).get(token)
        return None if value is None else int(value)
    return None


def convert_lisa_checkpoint(
    lisa_dir: str | Path, out_dir: str | Path, seg_token_id: int | None = None, image_token_id: int | None = None
):
    """Convert a LISA checkpoint directory and save the `Segmenter` to `out_dir`; returns the segmenter."""
    from transformers import LlavaForConditionalGeneration, SamModel

    from vlm_prune.models.segmenter import Segmenter, SegTokenError

    lisa_dir = Path(lisa_dir)
    lisa_config = json.loads((lisa_dir / "config.json").read_text())
    seg_token_id = seg_token_id if seg_token_id is not None else _added_token(lisa_dir, "[SEG]")
    if seg_token_id is None:
        raise SegTokenError(f"no [SEG] id: {lisa_dir}/added_tokens.json lacks it; pass --seg-token-id")
    image_token_id = image_token_id if image_token_id is not None else _added_token(lisa_dir, "<im_patch>")
    if image_token_id is None:
        raise PruneError("no image placeholder id: pass --image-token-id (a token id the processor expands)")
    state = load_lisa_state(lisa_dir)
    llava_config, sam_config, seg_config = configs_from_lisa(
        lisa_config, seg_token_id, image_token_id, "model.mm_projector.weight" in state
    )
    mask_decoder = sam_config.mask_decoder_config
    ours = lisa_to_ours(state, {"iou": mask_decoder.iou_head_depth, "hyper": 3})
    segmenter = Segmenter(LlavaForConditionalGeneration(llava_config), SamModel(sam_config), seg_config)
    missing, unexpected = segmenter.load_state_dict(ours, strict=False)
    missing = [key for key in missing if not key.startswith("vlm.model.vision_tower.")]
    if missing or unexpected:
        raise PruneError(f"the converted weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    segmenter.save_pretrained(out_dir)
    return segmenter.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a LISA checkpoint to a vlm_prune Segmenter")
    parser.add_argument("lisa_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--seg-token-id", type=int)
    parser.add_argument("--image-token-id", type=int)
    args = parser.parse_args(argv)
    convert_lisa_checkpoint(args.lisa_dir, args.out_dir, args.seg_token_id, args.image_token_id)
    print(f"saved the segmenter to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

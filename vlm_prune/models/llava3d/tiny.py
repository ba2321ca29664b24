"""Tiny random-weight LLaVA-3D models and scene inputs for tests (nothing downloads).

    model = build_tiny_llava3d(num_layers=4)                 # eval(), deterministic given `seed`
    inputs = make_scene_inputs(model, batch=2, padding="left")  # forward()/generate() kwargs
    alone = single_scene_row(inputs, 1)                      # row 1 alone, unpadded

Token ids follow `vlm_prune.toy_models` (pad 0, bos 1, eos 2, scene/image placeholder 3 = toy IMAGE_ID) plus
the click placeholder 7. Random scenes: V posed views of a random depth field; every row's content depends
on (seed, row index) only, and rows hold different voxel counts (the count is computed from the geometry,
as `Llava3DProcessor` does).
"""

from __future__ import annotations

import math

import torch

from vlm_prune.models.llava3d.configuration import Llava3DConfig
from vlm_prune.models.llava3d.geometry import scene_geometry
from vlm_prune.toy_models import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, SPECIAL_IDS, TEXT_ID_MIN, TINY_VOCAB

CLICK_ID = 7


def tiny_llava3d_config(
    num_layers: int = 4,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    hidden_size: int = 64,
    vocab_size: int = TINY_VOCAB,
    voxel_size: float = 0.2,
    max_voxels: int = 2560,
    voxel_seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Llava3DConfig:
    """A tiny `Llava3DConfig`: CLIP 2 layers x 32 wide, Llama `num_layers` x `hidden_size` (GQA 4/2 heads)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    config = Llava3DConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, click_token_id=CLICK_ID,
        image_seq_length=(image_size // patch_size) ** 2, voxel_size=voxel_size, max_voxels=max_voxels,
        voxel_seed=voxel_seed, tie_word_embeddings=False,
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    return config


def build_tiny_llava3d(
    num_layers: int = 4, *, seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
    **config_kwargs,
):
    """A random-weight tiny `Llava3DForConditionalGeneration` in eval mode, identical for the same `seed`.

    Weights are redrawn from a seeded generator (std 0.1, embeddings 1.0, norms 1/0); the lm_head rows of the
    special ids are zeroed so greedy decoding never emits them.
    """
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration

    config = tiny_llava3d_config(num_layers, attn_implementation=attn_implementation, **config_kwargs)
    model = Llava3DForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name.lower():
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            std = 1.0 if "embed_tokens" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.lm_head.weight[[*SPECIAL_IDS, CLICK_ID]] = 0.0
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def _rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_scene(seed: int, views: int = 3, size: int = 32, holes: float = 0.1) -> dict:
    """One random posed RGB-D scene: rgb (V, S, S, 3) uint8, depth (V, S, S) metres (about `holes` of it 0),
    intrinsics (4, 4), poses (V, 4, 4) camera-to-world, axis_align (4, 4) (a rotation about z and a shift)."""
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (views, size, size, 3), generator=g, dtype=torch.uint8)
    coarse = 1.0 + 2.5 * torch.rand(views, 1, 4, 4, generator=g)
    depth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    depth = depth * (torch.rand(views, size, size, generator=g) >= holes)
    intrinsics = torch.eye(4)
    intrinsics[0, 0] = intrinsics[1, 1] = float(size)
    intrinsics[0, 2] = intrinsics[1, 2] = size / 2
    poses = torch.eye(4).repeat(views, 1, 1)
    for v in range(views):
        poses[v, :3, :3] = _rotation(g)
        poses[v, :3, 3] = torch.randn(3, generator=g)
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    axis_align = torch.eye(4)
    axis_align[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    axis_align[:3, 3] = torch.randn(3, generator=g)
    return dict(rgb=rgb, depth=depth, intrinsics=intrinsics, poses=poses, axis_align=axis_align)


def normalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """(V, H, W, 3) uint8 -> (V, 3, H, W) float with CLIP's mean/std."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (rgb.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def make_scene_inputs(
    model,
    *,
    batch: int = 1,
    padding: str = "left",
    rows: list[int] | None = None,
    seed: int = 0,
    views: int = 3,
    clicks: bool = False,
    prompt_lengths: list[int] | None = None,
) -> dict:
    """forward()/generate() kwargs for `batch` scene rows (or the given `rows` indices).

    Each row = [bos] + prefix text + one placeholder per voxel (+ one click placeholder) + question; row r's
    content depends on (seed, r) only. Returns input_ids, attention_mask, pixel_values (B, V, 3, S, S),
    depths (B, V, S, S), intrinsics (B, V, 4, 4), poses (B, V, 4, 4), axis_align (B, 4, 4), and clicks (B, 1, 3)
    when `clicks`.
    """
    if padding not in ("left", "right"):
        raise ValueError("padding must be 'left' or 'right'")
    config = model.config
    size = config.vision_config.image_size
    grid = (size // config.vision_config.patch_size,) * 2
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    row_ids = list(range(batch)) if rows is None else list(rows)
    ids, scenes, points = [], [], []
    vocab = config.text_config.vocab_size
    for r in row_ids:
        g = torch.Generator().manual_seed(seed * 7919 + r)
        scene = random_scene(seed * 7919 + r, views=views, size=size)
        count = len(scene_geometry(
            scene["depth"], scene["intrinsics"], scene["poses"], scene["axis_align"], grid,
            config.voxel_size, config.max_voxels, config.voxel_seed,
        ))
        length = 6 + r % 3 if prompt_lengths is None else prompt_lengths[r]
        text = torch.randint(TEXT_ID_MIN, vocab, (max(length, 2),), generator=g).tolist()
        prefix, question = text[: len(text) // 2], text[len(text) // 2 :]
        row = [BOS_ID, *prefix, *([IMAGE_ID] * count)] + ([CLICK_ID] if clicks else []) + question
        ids.append(row)
        scenes.append(scene)
        points.append(torch.randn(1, 3, generator=g))
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, row in enumerate(ids):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        input_ids[b, span] = torch.tensor(row)
        attention_mask[b, span] = 1
    out = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "pixel_values": torch.stack([normalize_rgb(s["rgb"]) for s in scenes]).to(device, dtype),
        "depths": torch.stack([s["depth"] for s in scenes]).to(device),
        "intrinsics": torch.stack([s["intrinsics"].expand(views, 4, 4) for s in scenes]).to(device),
        "poses": torch.stack([s["poses"] for s in scenes]).to(device),
        "axis_align": torch.stack([s["axis_align"] for s in scenes]).to(device),
    }
    if clicks:
        out["clicks"] = torch.stack(points).to(device)
    return out


WORDS = (
    "USER ASSISTANT : ? , . [ ] what colour is the object nearest to of a an how many are there left right "
    "red green blue yellow black white box sphere cylinder seen from door yes no one two three four five"
).split()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A word-level `PreTrainedTokenizerFast` with the tiny model's ids: <pad> 0, <s> 1, </s> 2, <image> 3,
    <unk> 4, <boxes> 7 (`CLICK_ID`), then `WORDS` and fillers w0, w1, ... from `TEXT_ID_MIN` up to `vocab_size`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<image>": IMAGE_ID, "<unk>": 4, "<video>": 5,
                "<vision>": 6, "<boxes>": CLICK_ID, "<r8>": 8, "<r9>": 9}
    vocab = dict(specials)
    for index, word in enumerate(WORDS):
        vocab[word] = TEXT_ID_MIN + index
    filler = 0
    while len(vocab) < vocab_size:
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )
    hf.add_special_tokens({"additional_special_tokens": ["<image>", "<boxes>"]})
    return hf


SCENE_KEYS = ("pixel_values", "depths", "intrinsics", "poses", "axis_align", "clicks")


def single_scene_row(inputs: dict, i: int) -> dict:
    """Row i of `make_scene_inputs` alone, without padding."""
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][keep][None], "attention_mask": inputs["attention_mask"][i][keep][None]}
    for key in SCENE_KEYS:
        if key in inputs:
            out[key] = inputs[key][i : i + 1]
    return out


__all__ = [
    "CLICK_ID",
    "build_tiny_llava3d",
    "make_scene_inputs",
    "normalize_rgb",
    "random_scene",
    "single_scene_row",
    "tiny_llava3d_config",
    "tiny_tokenizer",
]

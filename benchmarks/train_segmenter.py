"""Train the embedded demo segmenter `llava_seg`: a dedicated tiny LLaVA + `[SEG]` + a tiny SAM, end to end.

The commands that built `vlm_prune/demo_models/llava_seg/` (one process, 1 thread, on the shared 2-core CPU). Run E
warm-starts EVERY tensor from run D's state (`/tmp/seg/run4/state.pt`, built by the two run-D commands below from
run C's `/tmp/seg/run2/state.pt`: see segmentation_notes.md), pretrains the vision tower on shape, then trains end to
end; the last command resumes the finished run and only ships it:

    # run D (the previous shipped model, gIoU 0.538; its state starts run E; run with --minutes 62, stopped at step
    # 3250 and resumed with --minutes 70)
    OMP_NUM_THREADS=1 nohup nice -n 19 .venv/bin/python benchmarks/train_segmenter.py --out /tmp/seg/run4 \\
        --steps 20000 --minutes 70 --init-from /tmp/seg/run2/state.pt --eval-every 250 > /tmp/seg/log4 2>&1 &
    # run E (shipped)
    OMP_NUM_THREADS=1 nohup nice -n 19 .venv/bin/python benchmarks/train_segmenter.py --out /tmp/seg/run5 \\
        --steps 20000 --minutes 52 --lr 1e-3 --init-from /tmp/seg/run4/state.pt --init-all \\
        --pretrain-vision-steps 3000 --vision-lr-scale 0.3 --eval-every 250 > /tmp/seg/log5 2>&1 &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_segmenter.py --out /tmp/seg/run5 --steps 20000 \\
        --minutes 52 --lr 1e-3 --init-from /tmp/seg/run4/state.pt --init-all --pretrain-vision-steps 3000 \\
        --vision-lr-scale 0.3 --ship

STATUS (run E, shipped): held-out gIoU 0.845, cIoU 0.855 on 400 test mosaics, unpruned (bar 0.75: met); per kind
referring_name 0.874, referring_position 0.897, same_color 0.800, odd_one_out 0.811
(`benchmarks/results/demo_segmenter.md`, segmentation_notes.md).

Model (`build`): a LLaVA of the embedded demo style but dedicated to 2x2 mosaics (128 px): CLIP vision tower at
128 px with 16 px patches (64 visual tokens instead of the demo LLaVA's 576), 8 Llama decoder layers (so that
LVLM_CSP's s1 < s2 < depth leaves each stage room), the demo LLaVA's word-level tokenizer plus the prompt words
and `[SEG]`; transformers' `SamModel` at 128 px (patch 16: an 8x8 image embedding, 32x32 low-res masks); LISA's
`text_hidden_fcs`, reading the hidden state one before `[SEG]` (`seg_hidden_offset=-1`). Everything from scratch
(no pretrained SAM or VLM is available offline). Two deliberate choices: the processor's chat template puts the
instruction BEFORE the image ("USER: segment the red circle\n<image> ASSISTANT: [SEG]."), so that every visual token
can read the prompt (see `segmenter_circuit.py`); and CLIP's position embeddings start at std 1 instead of 0.02
(at 0.02 the patches' place drowns in their pixels: a linear probe could not tell a token's cell after 200 steps).

Data: `vlm_prune.tasks.segmentation`'s layouts and prompts (referring_name, referring_position, same_color,
odd_one_out, in turn), drawn afresh every step from the TRAIN easy-VQA images only (`TrainStream`: the same
layouts, prompts and shape masks as `make_samples`, composed from cached arrays); held-out evaluation on
`make_samples("test", ...)` through the real processor and `Segmenter.predict_masks` (test images only).

Loss: LISA's mask loss (2.0 x BCE + 0.5 x dice on SAM's 32x32 low-res masks, targets area-downsampled), the LM's
cross-entropy on the answer "[SEG].", and training-only auxiliaries that are not shipped: SAM also decodes, in the
same call, a learned prompt of a random cell (the same mask loss against that cell's shape: always decidable, so SAM
learns foreground masks while the VLM learns to read the prompt); the target cell from the `[SEG]` reading state
(4-way CE, x0.5); each cell's shape and colour from the mean of its projected visual tokens (CE, x0.5); from
step `--attention-from` on, the attention auxiliary: -log of the share of the reading position's visual attention
(head mean, last 3 layers) on the target cell's tokens (x `--attention-weight`; off by default); `--circuit`
(default on, x1): `segmenter_circuit.py`'s dense losses on each step of the prompt-to-cell circuit (per-token
perception and the vision tower's in-cell attention, the visual tokens reading the prompt, per-token target flags,
the anchor and readout attention). Eager attention while training. AdamW,
linear warm-up then cosine decay over the run's progress = max(step / --steps, training time / --minutes).

Shape-pretraining phase (`--pretrain-vision-steps`, training only, before the end-to-end loop; `pretrain_vision`):
the vision tower + projector alone (no LLM, no SAM) on fresh TRAIN mosaics, AdamW at `--pretrain-lr` (50 warm-up
steps, then constant), batch `--pretrain-batch`: each projected visual token predicts its cell's shape and colour
(CE) and the cell-pooled tokens their cell's shape (CE x2). Why: in run D the per-token shape probe reached only
44 % (3 classes) after 7000 end-to-end steps, so the prompts that need shape failed (odd_one_out at chance). A
3-conv CNN classifies these cells' shapes at 98 % in 100 steps; a 16 px-patch ViT from scratch (2x64, 4x128, 2x256,
8 px patches, any LR tried) stayed under 45 % after 500-1000 steps, but run D's tower, alone and at 6 steps/s,
climbs to ~80 % on test mosaics in ~1000 steps. `--vision-lr-scale` then scales the tower's and projector's LR in
the end-to-end loop. Everything the phase trains is in `state.pt` (its history under "pretrain").

Resumable: `--out/state.pt` (model, heads, optimiser, step, history) after every evaluation (training time adds up
over resumed runs). `--ship` writes the final model (fp16) to `vlm_prune/demo_models/llava_seg/` and the report
(`benchmarks/results/demo_segmenter_train.json`, `demo_segmenter_loss.png`, `demo_segmenter.md`) with gIoU and
cIoU per prompt kind on `--report-samples` held-out mosaics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    from segmenter_circuit import (
        INSTRUCTION_FIRST_TEMPLATE,
        anchor_cells,
        cell_of_tokens,
        circuit_losses,
        make_circuit_heads,
    )
except ImportError:  # imported as benchmarks.train_segmenter
    from benchmarks.segmenter_circuit import (
        INSTRUCTION_FIRST_TEMPLATE,
        anchor_cells,
        cell_of_tokens,
        circuit_losses,
        make_circuit_heads,
    )

ROOT = Path(__file__).resolve().parent.parent
SHIP_DIR = ROOT / "vlm_prune" / "demo_models" / "llava_seg"
RESULTS = ROOT / "benchmarks" / "results"
IMAGE_PX = 128  # a 2x2 mosaic of 64 px cells, at its own size
CONFIG = dict(
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_PX,
                patch_size=16, hidden_act="quick_gelu"),
    text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
              head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6),
    sam=dict(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_dim=128,
                           image_size=IMAGE_PX, patch_size=16, output_channels=64, global_attn_indexes=[1],
                           window_size=4, num_pos_feats=32, use_rel_pos=False),
        prompt_encoder_config=dict(hidden_size=64, image_size=IMAGE_PX, image_embedding_size=8),
        mask_decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_dim=128,
                                 iou_head_hidden_dim=64),
    ),
)  # fmt: skip
LOW_RES = 32  # SAM's low-res mask side: 4 x its 8x8 image embedding


# ------------------------------------------------------------------------------------------------ model
def build_processor():
    """The demo LLaVA's tokenizer + the prompt words + `[SEG]`, with a 128 px CLIP image processor (16 px patches)
    and the instruction-first chat template (`segmenter_circuit.INSTRUCTION_FIRST_TEMPLATE`)."""
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from vlm_prune.demo import demo_model_path, load_processor
    from vlm_prune.models.segmenter import SEG_TOKEN
    from vlm_prune.tasks.segmentation import task_words

    base = load_processor(demo_model_path("llava"))
    tokenizer = base.tokenizer
    missing = [w for w in task_words() if tokenizer.unk_token_id in tokenizer(w, add_special_tokens=False).input_ids]
    tokenizer.add_tokens(missing)
    tokenizer.add_tokens(["."])  # the answer "[SEG]." ends with one
    tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    ip = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tokenizer, patch_size=CONFIG["vision"]["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=INSTRUCTION_FIRST_TEMPLATE,
    )  # fmt: skip
    return processor, missing


def build(seed: int):
    """(segmenter, processor, added words): the untrained dedicated segmenter (see the module docstring)."""
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SamConfig,
        SamModel,
    )

    from vlm_prune.models.segmenter import Segmenter, SegmenterConfig, seg_token_id

    processor, missing = build_processor()
    tok = processor.tokenizer
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **CONFIG["text"],
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CONFIG["vision"]), text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_PX // CONFIG["vision"]["patch_size"]) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )  # fmt: skip
    vlm = LlavaForConditionalGeneration(config)
    vlm.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=4,
    )  # fmt: skip
    with torch.no_grad():  # CLIP's default std 0.02 drowns the patch positions in the pixels' (std ~1) for good
        vlm.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, 1.0)
    sam = SamModel(SamConfig(**CONFIG["sam"]))
    segmenter = Segmenter(vlm, sam, SegmenterConfig(seg_token_id=seg_token_id(tok), seg_hidden_offset=-1))
    return segmenter, processor, missing


# ------------------------------------------------------------------------------------------------ data
class TrainStream:
    """Fresh training batches from the TRAIN easy-VQA images: `tasks.segmentation`'s layouts and prompts, the
    mosaic and its target mask composed from cached cell arrays (the same pixels as `compose_mosaic` /
    `mosaic_mask`), the prompts tokenized once each (left-padded, as the processor pads)."""

    def __init__(self, processor, seed: int, split: str = "train"):
        from PIL import Image

        from vlm_prune.data.mosaic import CELL_PX, COLORS, SHAPES, load_cells
        from vlm_prune.tasks.segmentation import shape_mask

        self.processor, self.cells = processor, load_cells(split)
        self.index = {c: i for i, c in enumerate(self.cells)}
        pixels = []
        for c in self.cells:
            with Image.open(c.path) as im:
                pixels.append(np.asarray(im.convert("RGB").resize((CELL_PX, CELL_PX))))
        self.pixels = torch.from_numpy(np.stack(pixels))  # (N, 64, 64, 3) uint8
        self.masks = torch.from_numpy(np.stack([shape_mask(c) for c in self.cells]))  # (N, 64, 64) bool
        self.shape_ids = torch.tensor([SHAPES.index(c.shape) for c in self.cells])
        self.color_ids = torch.tensor([COLORS.index(c.color) for c in self.cells])
        self.rng = random.Random(f"train_segmenter/{split}/{seed}")
        self.ids: dict[str, list[int]] = {}
        self.turn = 0

    def prompt_ids(self, prompt: str) -> list[int]:
        from PIL import Image

        from vlm_prune.demo import build_prompt
        from vlm_prune.tasks.segmentation import ANSWER

        if prompt not in self.ids:
            text = build_prompt(self.processor, prompt)
            image = Image.new("RGB", (IMAGE_PX, IMAGE_PX))
            ids = self.processor(text=[text], images=[image], return_tensors="pt").input_ids[0].tolist()
            self.ids[prompt] = ids + self.processor.tokenizer(ANSWER, add_special_tokens=False).input_ids
        return self.ids[prompt]

    def batch(self, n: int) -> dict:
        from vlm_prune.data.mosaic import CELL_PX
        from vlm_prune.tasks.segmentation import KINDS, _layout_for, prompt_for

        rows = []
        while len(rows) < n:
            kind = KINDS[self.turn % len(KINDS)]
            cells = _layout_for(kind, self.cells, 2, self.rng)
            found = prompt_for(kind, cells, 2, self.rng)
            if found is None:
                continue
            self.turn += 1
            rows.append((torch.tensor([self.index[c] for c in cells]), *found, kind))
        cells = torch.stack([r[0] for r in rows])  # (B, 4)
        tiles = self.pixels[cells].reshape(n, 2, 2, CELL_PX, CELL_PX, 3).permute(0, 1, 3, 2, 4, 5)
        images = tiles.reshape(n, 2 * CELL_PX, 2 * CELL_PX, 3)  # (B, 128, 128, 3) uint8
        target = torch.tensor([r[2] for r in rows])
        every = torch.zeros(n, 4, 4, CELL_PX, CELL_PX, dtype=torch.bool)  # (B, cell k, place, 64, 64)
        every[:, torch.arange(4), torch.arange(4)] = self.masks[cells]
        every = every.reshape(n, 4, 2, 2, CELL_PX, CELL_PX).permute(0, 1, 2, 4, 3, 5)
        every = every.reshape(n, 4, 2 * CELL_PX, 2 * CELL_PX)  # (B, 4, 128, 128): cell k's shape mask alone
        masks = every[torch.arange(n), target]
        ids = [self.prompt_ids(r[1]) for r in rows]
        from vlm_prune.data.mosaic import SHAPES

        anchor = anchor_cells([r[3] for r in rows], [r[1] for r in rows], self.shape_ids[cells], SHAPES)
        width = max(len(i) for i in ids)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return {"images": images, "masks": masks, "cell_masks": every, "input_ids": input_ids,
                "attention_mask": attention_mask, "target": target, "shape": self.shape_ids[cells],
                "color": self.color_ids[cells], "kinds": [r[3] for r in rows], "anchor": anchor}  # fmt: skip


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, (x / 255 - mean) / std."""
    x = images.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------ loss
def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


def make_heads(hidden: int) -> nn.ModuleDict:
    """Training-only auxiliary heads (not shipped): target cell from [SEG]; per visual token shape and colour."""
    from vlm_prune.data.mosaic import COLORS, SHAPES

    heads = nn.ModuleDict({"cell": nn.Linear(hidden, 4), "shape": nn.Linear(hidden, len(SHAPES)),
                           "color": nn.Linear(hidden, len(COLORS))})  # fmt: skip
    heads["cell_prompts"] = nn.Embedding(4, CONFIG["sam"]["prompt_encoder_config"]["hidden_size"])
    heads.update(make_circuit_heads(hidden, len(SHAPES), len(COLORS)))
    return heads


def masks_loss(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of (B, LOW_RES, LOW_RES) low-res logits against (B, 128, 128) bool masks (area-downsampled)."""
    target = F.interpolate(masks.float()[:, None], size=(LOW_RES, LOW_RES), mode="area")[:, 0]
    return F.binary_cross_entropy_with_logits(logits, target), dice_loss(logits, target)


def attention_loss(attentions, input_ids, columns, image_token: int, target: torch.Tensor, layers: int) -> torch.Tensor:
    """-log of the share of the reading position's visual attention (head mean, last `layers` layers) that lands on
    the target cell's tokens. attentions: per layer (B, H, L, L); columns: (B,) reading columns."""
    n = input_ids.shape[0]
    visual = input_ids == image_token  # (B, L), 64 per row, in raster order
    side = int(math.isqrt(int(visual[0].sum())))
    r, c = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    cell_of = (r // (side // 2)) * 2 + c // (side // 2)  # (64,)
    losses = []
    for a in attentions[-layers:]:
        row = a[torch.arange(n), :, columns].mean(1)  # (B, L) head-mean attention of the reading position
        v = row[visual].view(n, -1)  # (B, 64)
        on = (v * (cell_of[None] == target[:, None])).sum(-1)
        losses.append(-torch.log(on / v.sum(-1).clamp_min(1e-9) + 1e-6).mean())
    return torch.stack(losses).mean()


def batch_loss(segmenter, heads, batch: dict, clip_mean, clip_std, generator,
               attention_weight: float = 0.0, circuit: float = 0.0) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The training loss of one batch (see the module docstring). SAM decodes two prompts per image in one call:
    the `[SEG]` embedding (the task's target) and, training only, a learned prompt of a random cell (that cell's
    shape: SAM learns foreground masks from a prompt that is always decidable, while the VLM learns to read)."""
    from vlm_prune.tasks.segmentation import SAM_MEAN, SAM_STD

    vlm = segmenter.vlm
    captured = {}
    hook = vlm.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.setdefault("v", o))
    first = vlm.model.vision_tower.encoder.layers[0].self_attn
    vision_hook = first.register_forward_hook(lambda m, i, o: captured.update(vision_attention=o[1]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    try:
        out = vlm(input_ids=ids, attention_mask=mask, pixel_values=normalise(batch["images"], clip_mean, clip_std),
                  output_hidden_states=True, use_cache=False,
                  output_attentions=attention_weight > 0 or circuit > 0)  # fmt: skip
    finally:
        hook.remove()
        vision_hook.remove()
    columns = torch.stack([c[0] for c in segmenter.seg_positions(ids, mask)])
    n = ids.shape[0]
    seg = out.hidden_states[-1][torch.arange(n), columns]  # (B, D) the [SEG] reading state
    cell = torch.randint(0, 4, (n,), generator=generator)
    prompts = torch.stack([segmenter.text_hidden_fcs(seg), heads["cell_prompts"](cell)], dim=1)  # (B, 2, P)
    logits = torch.stack(segmenter.decode_masks(normalise(batch["images"], SAM_MEAN, SAM_STD), list(prompts),
                                                output_size=(LOW_RES, LOW_RES)))  # (B, 2, h, w)  # fmt: skip
    bce, dice = masks_loss(logits[:, 0], batch["masks"])
    aux_bce, aux_dice = masks_loss(logits[:, 1], batch["cell_masks"][torch.arange(n), cell])
    k = 2  # the answer "[SEG]." is 2 tokens: train the LM to say it
    lm = out.logits[:, -k - 1 : -1]
    ce = F.cross_entropy(lm.reshape(-1, lm.shape[-1]), ids[:, -k:].reshape(-1))
    cell_ce = F.cross_entropy(heads["cell"](seg), batch["target"])
    v = captured["v"]  # (B, 64, D) projected visual tokens; token (r, c) of the 8x8 grid lies in cell (r//4, c//4)
    side = int(math.isqrt(v.shape[1]))
    r, c = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    cell_of = (r // (side // 2)) * 2 + c // (side // 2)
    pooled = torch.zeros(n, 4, v.shape[-1], dtype=v.dtype).index_add_(1, cell_of, v) / (side * side // 4)
    tok = F.cross_entropy(heads["shape"](pooled).flatten(0, 1), batch["shape"].flatten())
    tok = tok + F.cross_entropy(heads["color"](pooled).flatten(0, 1), batch["color"].flatten())
    loss = 2.0 * bce + 0.5 * dice + 2.0 * aux_bce + 0.5 * aux_dice + ce + 0.5 * cell_ce + 0.5 * tok
    parts = {"bce": bce, "dice": dice, "aux_dice": aux_dice, "lm": ce, "cell": cell_ce, "recog": tok}
    if circuit > 0:
        found = circuit_losses(out, v, heads, {**batch, "vision_attention": captured["vision_attention"]}, ids, mask,
                               columns, vlm.config.image_token_index)
        loss = loss + circuit * sum(found.values())
        parts.update(found)
    if attention_weight > 0:
        attn = attention_loss(out.attentions, ids, columns, vlm.config.image_token_index, batch["target"], 3)
        loss = loss + attention_weight * attn
        parts["attention"] = attn
    return loss, {key: float(value.detach()) for key, value in parts.items()}


# ------------------------------------------------------------------------------------------------ vision pretraining
def vision_parameters(segmenter) -> list[nn.Parameter]:
    """The vision tower's and the projector's parameters (what the shape-pretraining phase trains)."""
    model = segmenter.vlm.model
    return list(model.vision_tower.parameters()) + list(model.multi_modal_projector.parameters())


def perception_loss(segmenter, heads, batch: dict, clip_mean, clip_std) -> tuple[torch.Tensor, dict]:
    """The training-only shape-pretraining loss of the vision tower + projector alone (no LLM, no SAM): each projected
    visual token predicts its cell's shape and colour (per-token CE), and the cell-pooled tokens its shape (CE x2).
    Returns (loss, {"shape_acc", "color_acc"} per token)."""
    model = segmenter.vlm.model
    pixels = normalise(batch["images"], clip_mean, clip_std)
    hidden = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    v = model.multi_modal_projector(hidden)  # (B, V, D), what the LLM receives
    n, n_visual = v.shape[:2]
    cell_of = cell_of_tokens(n_visual)
    shape_tok, color_tok = batch["shape"][:, cell_of], batch["color"][:, cell_of]  # (B, V)
    shape_logits, color_logits = heads["tok_shape"](v), heads["tok_color"](v)
    pooled = torch.zeros(n, 4, v.shape[-1], dtype=v.dtype).index_add_(1, cell_of, v) / (n_visual // 4)
    loss = (F.cross_entropy(shape_logits.flatten(0, 1), shape_tok.flatten())
            + F.cross_entropy(color_logits.flatten(0, 1), color_tok.flatten())
            + 2.0 * F.cross_entropy(heads["shape"](pooled).flatten(0, 1), batch["shape"].flatten()))  # fmt: skip
    accuracy = {"shape_acc": float((shape_logits.argmax(-1) == shape_tok).float().mean()),
                "color_acc": float((color_logits.argmax(-1) == color_tok).float().mean())}  # fmt: skip
    return loss, accuracy


def pretrain_vision(segmenter, heads, processor, steps: int, batch: int, lr: float, seed: int) -> list[dict]:
    """The shape-pretraining phase (training only): `steps` AdamW steps of `perception_loss` on fresh TRAIN mosaics
    (linear warm-up over 50 steps, then constant `lr`), the tower, projector and perception probes only. Returns the
    history (train accuracy per 50 steps, and per-token accuracy on 64 TEST mosaics)."""
    from tqdm import tqdm

    ip = processor.image_processor
    probes = [heads[k] for k in ("tok_shape", "tok_color", "shape")]
    params = vision_parameters(segmenter) + [p for h in probes for p in h.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream, test = TrainStream(processor, seed=seed + 5), TrainStream(processor, seed=seed + 6, split="test")
    test_batch = test.batch(64)
    history, window = [], []
    for step in tqdm(range(1, steps + 1), desc="pretrain_vision", mininterval=30):
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        loss, acc = perception_loss(segmenter, heads, stream.batch(batch), ip.image_mean, ip.image_std)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        window.append({"loss": float(loss.detach()), **acc})
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                _, held = perception_loss(segmenter, heads, test_batch, ip.image_mean, ip.image_std)
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            history.append({"step": step, **mean, "test_shape_acc": held["shape_acc"],
                            "test_color_acc": held["color_acc"]})  # fmt: skip
            window = []
            print("pretrain " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in history[-1].items()), flush=True)  # fmt: skip
    return history


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(segmenter, processor, samples, batch: int = 32) -> dict:
    """gIoU / cIoU overall and per prompt kind, through the real processor and `predict_masks` (128x128)."""
    from vlm_prune.tasks.segmentation import giou_ciou, sam_pixel_values, teacher_forced_inputs

    was = segmenter.training
    segmenter.eval()
    preds = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = dict(teacher_forced_inputs(segmenter.vlm, processor, chunk))
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        sam = sam_pixel_values([s.image for s in chunk], segmenter.sam.config.vision_config.image_size)
        masks = segmenter.predict_masks(ids, sam, attention_mask=mask, output_size=tuple(chunk[0].mask.shape), **inputs)
        preds += [m[0] for m in masks]
    segmenter.train(was)
    out = giou_ciou(preds, [s.mask for s in samples])
    for kind in sorted({s.kind for s in samples}):
        pick = [i for i, s in enumerate(samples) if s.kind == kind]
        out[kind] = giou_ciou([preds[i] for i in pick], [samples[i].mask for i in pick])
    return out


def lr_at(progress: float, warm: float = 0.08, floor: float = 0.03) -> float:
    """The LR factor at `progress` in [0, 1] of the run: linear warm-up, then cosine decay to `floor`."""
    if progress < warm:
        return max(progress / warm, 0.01)
    t = min(1.0, (progress - warm) / (1 - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------------ ship
def plot_loss(history: list[dict], evals: list[dict], path: Path, pretrain: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if pretrain else 2, figsize=(15 if pretrain else 10, 3.6))
    a, b = axes[-2:]
    if pretrain:
        p = axes[0]
        for key, label in (("shape_acc", "shape (train)"), ("test_shape_acc", "shape (test)"),
                           ("color_acc", "colour (train)"), ("test_color_acc", "colour (test)")):  # fmt: skip
            p.plot([h["step"] for h in pretrain], [h[key] for h in pretrain], label=label)
        p.set_xlabel("pretraining step")
        p.set_title("vision pretraining: per-token accuracy")
        p.legend()
    steps = [h["step"] for h in history]
    for key in ("loss", "bce", "dice", "aux_dice", "cell", "recog"):
        a.plot(steps, [h[key] for h in history], label=key)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_title("training losses (mean per 25 steps)")
    a.legend()
    b.plot([e["step"] for e in evals], [e["giou"] for e in evals], "o-", label="gIoU")
    b.plot([e["step"] for e in evals], [e["ciou"] for e in evals], "s-", label="cIoU")
    b.axhline(0.75, color="gray", ls="--", label="bar 0.75")
    b.set_xlabel("step")
    b.set_title("held-out test mosaics (unpruned)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ship(segmenter, processor, report: dict) -> None:
    import shutil

    if SHIP_DIR.exists():
        shutil.rmtree(SHIP_DIR)
    segmenter.half().save_pretrained(SHIP_DIR, processor=processor)
    segmenter.float()
    report["files"] = {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                       for p in sorted(SHIP_DIR.rglob("*.safetensors"))}  # fmt: skip
    (RESULTS / "demo_segmenter_train.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_loss(report["history"], report["evals"], RESULTS / "demo_segmenter_loss.png",
              report.get("pretrain_vision", {}).get("history"))
    final = report["final"]
    lines = [
        "# The embedded demo segmenter `llava_seg`",
        "",
        f"Built by `{report['command']}` ({report['machine']}).",
        f"{report['steps']} steps of batch {report['config']['batch']} in {report['minutes']:.0f} min, seed "
        f"{report['config']['seed']}; {report['parameters']:,} parameters, {report['size_mb']:.1f} MB fp16.",
        "",
        f"Held-out: {final['n']} test mosaics (`make_samples('test', {final['n']}, seed={final['seed']})`, test "
        "easy-VQA images only), reloaded from the saved fp16 checkpoint in float32, unpruned, teacher-forced "
        "(\"[SEG].\" appended), masks at 128x128. gIoU = mean per-mask IoU, cIoU = sum I / sum U (LISA's).",
        "",
        "| prompt kind | group | n | gIoU | cIoU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in ("referring_name", "referring_position", "same_color", "odd_one_out", "referring", "reasoning"):
        r = final[kind]
        group = "referring" if kind.startswith("referring") else "reasoning"
        lines.append(f"| {kind} | {group if kind not in ('referring', 'reasoning') else 'all'} | {r['n']} | "
                     f"{r['giou']:.3f} | {r['ciou']:.3f} |")  # fmt: skip
    lines.append(f"| **all** | | {final['n']} | **{final['giou']:.3f}** | **{final['ciou']:.3f}** |")
    lines += ["", "Bar (issue 10): gIoU >= 0.75 unpruned: " + ("met." if final["giou"] >= 0.75 else "**missed**."),
              "", "![loss](demo_segmenter_loss.png)", ""]  # fmt: skip
    (RESULTS / "demo_segmenter.md").write_text("\n".join(lines))


def final_report(directory: Path, n: int, seed: int) -> dict:
    """gIoU / cIoU of the saved checkpoint (reloaded in float32) on `n` held-out test mosaics, per kind and group."""
    from vlm_prune.demo import load_processor
    from vlm_prune.models.segmenter import Segmenter
    from vlm_prune.tasks.segmentation import make_samples

    segmenter = Segmenter.from_pretrained(directory, dtype=torch.float32)
    processor = load_processor(directory / "vlm")
    samples = make_samples("test", n, seed=seed)
    scores = evaluate(segmenter, processor, samples)
    out = {"n": n, "seed": seed, "giou": scores["giou"], "ciou": scores["ciou"]}
    for kind in ("referring_name", "referring_position", "same_color", "odd_one_out"):
        out[kind] = dict(scores[kind], n=sum(s.kind == kind for s in samples))
    for group in ("referring", "reasoning"):
        pick = [s for s in samples if s.kind.startswith("referring") == (group == "referring")]
        scored = evaluate(segmenter, processor, pick)
        out[group] = {"giou": scored["giou"], "ciou": scored["ciou"], "n": len(pick)}
    return out


def build_args(argv: list[str]) -> list[str]:
    """The training command's arguments: `argv` without --ship and --load-note (which only shape the report)."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--ship":
            skip = False
            continue
        if a == "--load-note":
            skip = True
            continue
        if not a.startswith("--load-note="):
            out.append(a)
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    from vlm_prune.tasks.segmentation import make_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="/tmp/seg/run", help="checkpoint folder (state.pt; resumable)")
    parser.add_argument("--steps", type=int, default=2500, help="total optimiser steps (the LR schedule's length)")
    parser.add_argument("--minutes", type=float, default=64.0,
                        help="training-time cap (the LR schedule ends at --steps or --minutes, whichever is first)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--report-samples", type=int, default=400)
    parser.add_argument("--circuit", type=float, default=1.0,
                        help="weight of segmenter_circuit's losses (perception, read, anchor, target, readout); 0: off")
    parser.add_argument("--init-from", default=None,
                        help="a state.pt whose SAM and cell prompts (same shapes) start the run")
    parser.add_argument("--init-all", action="store_true",
                        help="with --init-from: start EVERY tensor of the model and the heads whose shape matches")
    parser.add_argument("--pretrain-vision-steps", type=int, default=0,
                        help="the shape-pretraining phase (training only, before the end-to-end loop): this many steps"
                        " of the vision tower + projector alone on per-token and cell-pooled shape/colour labels")
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="LR factor of the vision tower + projector in the end-to-end loop")
    parser.add_argument("--attention-from", type=int, default=10**9,
                        help="step from which the attention auxiliary is on (see the module docstring)")
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="at the end, write llava_seg and the report")
    parser.add_argument("--load-note", default="load average 4-6 while training",
                        help="the machine's load while training, for the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    segmenter, processor, added = build(args.seed)
    heads = make_heads(segmenter.vlm.config.text_config.hidden_size)
    params = list(segmenter.parameters()) + list(heads.parameters())
    vision = {id(p) for p in vision_parameters(segmenter)}
    groups = []
    for scale, members in ((1.0, [p for p in params if id(p) not in vision]),
                           (args.vision_lr_scale, [p for p in params if id(p) in vision])):  # fmt: skip
        groups += [{"params": [p for p in members if p.ndim >= 2], "weight_decay": 0.01, "scale": scale},
                   {"params": [p for p in members if p.ndim < 2], "weight_decay": 0.0, "scale": scale}]  # fmt: skip
    optimiser = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    step, history, evals, seconds, pretrain = 0, [], [], 0.0, []
    if (out / "state.pt").exists():
        state = torch.load(out / "state.pt", weights_only=False)
        segmenter.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimiser.load_state_dict(state["optimiser"])
        step, history, evals, seconds = state["step"], state["history"], state["evals"], state["seconds"]
        pretrain = state.get("pretrain", [])
        print(f"resumed at step {step}", flush=True)
    else:
        if args.init_from:
            init = torch.load(args.init_from, weights_only=False)
            own = segmenter.state_dict()
            keep = {k: v for k, v in init["model"].items() if k in own and own[k].shape == v.shape
                    and (args.init_all or k.startswith("sam."))}  # fmt: skip
            segmenter.load_state_dict(keep, strict=False)
            if args.init_all:
                mine = heads.state_dict()
                found = {k: v for k, v in init["heads"].items() if k in mine and mine[k].shape == v.shape}
                heads.load_state_dict(found, strict=False)
            else:
                heads["cell_prompts"].load_state_dict({"weight": init["heads"]["cell_prompts.weight"]})
            print(f"initialised {len(keep)} tensors from {args.init_from}", flush=True)
        if args.pretrain_vision_steps > 0:
            t_pre = time.time()
            pretrain = pretrain_vision(segmenter, heads, processor, args.pretrain_vision_steps, args.pretrain_batch,
                                       args.pretrain_lr, args.seed)  # fmt: skip
            pretrain[-1]["seconds"] = time.time() - t_pre
            torch.save({"model": segmenter.state_dict(), "heads": heads.state_dict(),
                        "optimiser": optimiser.state_dict(), "step": 0, "history": [], "evals": [], "seconds": 0.0,
                        "pretrain": pretrain}, out / "state.pt")  # fmt: skip
    stream = TrainStream(processor, seed=args.seed * 100003 + step)
    held_out = make_samples("test", args.eval_samples, seed=999)
    ip = processor.image_processor
    clip_mean, clip_std = ip.image_mean, ip.image_std
    generator = torch.Generator().manual_seed(args.seed * 100003 + step)
    segmenter.train()
    window: list[dict] = []
    t0 = time.time()
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, desc="train_segmenter", mininterval=30)
    def progress() -> float:  # the schedule runs over --steps or --minutes of training, whichever ends first
        return max(step / args.steps, (seconds + time.time() - t0) / (args.minutes * 60))

    while progress() < 1:
        for group in optimiser.param_groups:
            group["lr"] = args.lr * group["scale"] * lr_at(progress())
        attending = step >= args.attention_from
        if (attending or args.circuit > 0) and segmenter.vlm.config._attn_implementation != "eager":
            segmenter.vlm.set_attn_implementation("eager")  # attention weights for the attention auxiliary
        loss, parts = batch_loss(segmenter, heads, stream.batch(args.batch), clip_mean, clip_std, generator,
                                 args.attention_weight if attending else 0.0, args.circuit)  # fmt: skip
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        step += 1
        bar.update(1)
        window.append({"loss": float(loss.detach()), **parts})
        if step % 25 == 0:
            mean = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[-1]}
            history.append({"step": step, **mean})
            window = []
            print(f"step {step} " + " ".join(f"{k} {v:.3f}" for k, v in mean.items())
                  + f" {seconds + time.time() - t0:.0f}s", flush=True)  # fmt: skip
        if step % args.eval_every == 0 or progress() >= 1:
            scores = evaluate(segmenter, processor, held_out)
            evals.append({"step": step, "seconds": seconds + time.time() - t0, **scores})
            print(json.dumps({k: round(v["giou"] if isinstance(v, dict) else v, 3)
                              for k, v in evals[-1].items()}), flush=True)  # fmt: skip
            state = {"model": segmenter.state_dict(), "heads": heads.state_dict(),
                     "optimiser": optimiser.state_dict(), "step": step, "history": history, "evals": evals,
                     "seconds": seconds + time.time() - t0, "pretrain": pretrain}  # fmt: skip
            torch.save(state, out / "state.pt")
    bar.close()
    seconds += time.time() - t0
    segmenter.vlm.set_attn_implementation("sdpa")  # what the saved model runs with
    segmenter.save_pretrained(out / "final", processor=processor)
    if not args.ship:
        print(f"stopped at step {step} ({seconds / 60:.1f} min of training)")
        return
    import os

    n_params = sum(p.numel() for p in segmenter.parameters())
    report = {
        "command": "OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/train_segmenter.py "
        + " ".join(build_args(sys.argv[1:])) + " (then the same with --ship)",
        "schedule": f"ended by {'steps' if step >= args.steps else 'minutes'} (progress = max(step / steps, "
        "training seconds / (60 * minutes)))",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
        f"engineers' jobs ({args.load_note}), {args.threads} thread, torch {torch.__version__}",
        "config": {**CONFIG, "batch": args.batch, "lr": args.lr, "seed": args.seed, "steps": args.steps,
                   "added_words": added, "seg_hidden_offset": -1, "low_res_mask": LOW_RES,
                   "loss": "2 bce + 0.5 dice (the [SEG] mask) + 2 bce + 0.5 dice (a learned cell prompt's mask) + lm ce"
                   " + 0.5 cell ce + 0.5 cell-pooled shape/colour ce + circuit x (perception + read + flags + anchor"
                   " + readout + cell_attention)", "circuit": args.circuit,
                   "chat_template": "instruction first (segmenter_circuit.INSTRUCTION_FIRST_TEMPLATE)"},
        "steps": step, "minutes": seconds / 60, "parameters": n_params, "size_mb": 2 * n_params / 2**20,
        "history": history, "evals": [{k: v for k, v in e.items() if not isinstance(v, dict)} for e in evals],
        "pretrain_vision": {"steps": args.pretrain_vision_steps, "batch": args.pretrain_batch,
                            "lr": args.pretrain_lr, "history": pretrain},
    }  # fmt: skip
    segmenter.half().save_pretrained(SHIP_DIR, processor=processor)
    segmenter.float()
    report["final"] = final_report(SHIP_DIR, args.report_samples, seed=1234)
    ship(segmenter, processor, report)
    print(json.dumps(report["final"], indent=1))


if __name__ == "__main__":
    main()

"""Train the two embedded demo models of vlm_prune on the mosaic task.

    python benchmarks/train_demo_models.py --model both                  # CUDA if present, else CPU
    python benchmarks/train_demo_models.py --model llava --vision-steps 2 --joint-steps 2 --eval-n 8 \\
        --save-dir /tmp/x --results-dir /tmp/x                             # smoke test

Per model ("llava", "qwen2_vl") it:
  1. trains a word-level tokenizer with `tokenizers` on the task's text (`vlm_prune.data.task_corpus`);
  2. builds the real processor (LlavaProcessor + CLIPImageProcessor, or Qwen2VLProcessor +
     Qwen2VLImageProcessor with min_pixels = max_pixels = 192*192) with a chat template;
  3. builds a small real HF model (LlavaForConditionalGeneration / Qwen2VLForConditionalGeneration) sized so a
     192x192 mosaic gives 576 visual tokens (LLaVA: patch 8 -> 24x24; Qwen2-VL: patch 4, merge 2 -> 24x24);
  4. trains it from scratch on train mosaics drawn on the fly from train easy-VQA images only;
  5. saves it in fp16 with its processor (`save_pretrained`), reloads the saved folder in float32 through
     AutoProcessor / AutoModelForImageTextToText and evaluates it per question type on held-out test mosaics
     with greedy `generate`;
  6. writes the loss curve (PNG + JSON) to --results-dir and, at the end, `demo_models.md` there.

Training recipe (sized so that it converges on a few CPU cores; a plain answer-only loss sat on the answer
prior for thousands of steps in a first GPU attempt, see `demo_models.md`):
  * stage "vision": the vision tower + projector/merger alone, with a dense auxiliary loss: linear heads on
    every visual token (the projector output, i.e. the LLM's input) predict the shape and colour of the
    cell the token lies in (and, for LLaVA, the cell index). Qwen2-VL's tower (rotary positions only) is
    trained here on 2x2 mosaics, which is cheaper and transfers to any grid.
  * stage "joint": the whole model, on 3x3 mosaics with several questions per mosaic: the prompt prefix
    (text + 576 image tokens, identical for every question) runs once, its KV cache is repeated for the
    questions, and each question + answer runs as a suffix on it (checked against a plain forward at
    start). Losses: cross-entropy on the answer tokens (answer word + end-of-turn) + the dense loss +
    an attention loss for cell questions: in the last decoder layer, the token that predicts the answer
    should put its attention (mean over heads) on the visual tokens of the asked cell.
  The auxiliary heads are not part of the saved model; inference is the plain HF model.

Batches are built on the training device: the train images sit in one uint8 tensor, a mosaic is an index
gather, and pixel normalisation / Qwen2-VL patchification replicate the saved image processor (checked
against the processor's own output at start).

Reproducible: everything is seeded (--seed); the config below, the stage step counts and the loss history
go to the JSON. With --*-minutes the step count is calibrated on the first steps and recorded; rerun with
--vision-steps/--joint-steps set to those numbers to repeat a run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.demo_depth import expand_state_dict, expansion_plan, mapped_layer  # noqa: E402
from vlm_prune.data import mosaic as M  # noqa: E402
from vlm_prune.demo import (  # noqa: E402
    _torchvision_available,
    build_prompt,
    evaluate,
    image_only_qwen2vl_processor,
    load_model,
)

# ----------------------------------------------------------------------------------------------- config
TRAIN = {
    "seed": 0,
    "grid": 3,
    "vision": {"batch": 8, "lr": 3e-3, "warmup": 30, "grid": {"llava": 3, "qwen2_vl": 2}},
    "joint": {"mosaics": 4, "questions": 24, "lr": 2e-3, "warmup": 40, "yesno_lr_mult": 10.0},
    "min_lr_ratio": 0.05,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
    "loss_weights": {"answer": 1.0, "dense": 0.5, "attention": 0.5},
    # question-type mix of the training stream (cell questions weighted up: they carry the bar)
    "qtype_weights": {"color": 0.28, "shape": 0.28, "yesno": 0.28, "count": 0.16},
    "eval_n": 400,  # held-out test mosaics, balanced over the 4 question types
    "eval_seed": 1234,
    "log_every": 5,
}

MODELS = {
    "llava": {
        "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "image_size": 192, "patch_size": 8},
        "text": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
                 "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024},
        "vision_feature_layer": -1,
    },
    # Qwen2-VL has no absolute positions in its ViT: the decoder finds a cell through M-RoPE alone. With
    # head_dim 32 the width section gets the 6 lowest of 16 rotary frequencies; rope_theta 30 keeps them
    # turning by 0.5-2.9 rad across 24 columns (with 10000 they barely move and columns look alike).
    "qwen2_vl": {
        "vision": {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4, "patch_size": 4,
                   "spatial_merge_size": 2, "temporal_patch_size": 2},
        "text": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
                 "rope_theta": 30.0, "mrope_section": [4, 6, 6]},
    },
}  # fmt: skip

IMAGE_PX = 192
VAL_SEED = 4321  # --val-every: held-out monitoring mosaics, another seed than TRAIN["eval_seed"]
# decoder layers (of the 4-layer recipe) whose head 0 / head 1 get the attention losses; a deeper decoder built
# with --expand-layers keeps them on the same original layers, at their new positions (benchmarks/demo_depth.py)
RETRIEVAL_LAYER, YESNO_LAYER = 2, 3
LLAVA_CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = {
    "llava": {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "extra": ["<image>"]},
    "qwen2_vl": {
        "pad": "<|endoftext|>", "unk": "<unk>", "bos": None, "eos": "<|im_end|>",
        "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    },
}  # fmt: skip


# ------------------------------------------------------------------------------------ tokenizer/processor
def build_tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = SPECIALS[family]
    specials = [t for t in (sp["pad"], sp["unk"], sp["bos"], sp["eos"]) if t] + sp["extra"]
    corpus = M.task_corpus(3) + M.task_corpus(2) + M.task_corpus(4)
    corpus += ["USER: ASSISTANT:", "user assistant system"]
    tok = Tokenizer(models.WordLevel(unk_token=sp["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    if sp["bos"]:
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A $B", special_tokens=[(sp["bos"], bos_id)]
        )
    kwargs = {"pad_token": sp["pad"], "unk_token": sp["unk"], "eos_token": sp["eos"], "padding_side": "left"}
    if sp["bos"]:
        kwargs["bos_token"] = sp["bos"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.add_special_tokens({"additional_special_tokens": sp["extra"]})
    hf.model_max_length = 2048
    return hf


def build_processor(family: str, tokenizer):
    from transformers import LlavaProcessor, Qwen2VLProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if family == "llava":
        ip = _image_processor(
            "CLIPImageProcessor",
            size={"shortest_edge": IMAGE_PX},
            crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=MODELS["llava"]["vision"]["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT,
        )
    v = MODELS["qwen2_vl"]["vision"]
    ip = _image_processor(
        "Qwen2VLImageProcessor",
        min_pixels=IMAGE_PX * IMAGE_PX,
        max_pixels=IMAGE_PX * IMAGE_PX,
        patch_size=v["patch_size"],
        merge_size=v["spatial_merge_size"],
        temporal_patch_size=v["temporal_patch_size"],
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    if not _torchvision_available():  # transformers cannot build Qwen2VLProcessor without torchvision
        return image_only_qwen2vl_processor(ip, tokenizer, QWEN_CHAT)
    try:
        return Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_CHAT)
    except TypeError:  # transformers versions that require a video processor
        from transformers import Qwen2VLVideoProcessor

        try:
            vp = Qwen2VLVideoProcessor(
                size={"shortest_edge": IMAGE_PX * IMAGE_PX, "longest_edge": IMAGE_PX * IMAGE_PX},
                patch_size=v["patch_size"],
                merge_size=v["spatial_merge_size"],
                temporal_patch_size=v["temporal_patch_size"],
                image_mean=list(OPENAI_CLIP_MEAN),
                image_std=list(OPENAI_CLIP_STD),
            )
        except (TypeError, ValueError):
            vp = Qwen2VLVideoProcessor()
        return Qwen2VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp, chat_template=QWEN_CHAT)


def _image_processor(name: str, **kwargs):
    """The torchvision-backed class when importable, else its PIL twin (same saved config)."""
    import transformers

    for cls_name in (name, name + "Pil"):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            return cls(**kwargs)
        except ImportError:
            continue
    raise RuntimeError(f"no usable {name} in transformers {transformers.__version__}")


# -------------------------------------------------------------------------------------------------- model
def build_model(family: str, tokenizer, num_layers: int | None = None):
    """The untrained model of `family`; `num_layers` overrides the decoder depth of MODELS."""
    from transformers import GenerationConfig

    ids = {
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id if tokenizer.bos_token else None,
    }
    cfg = model_config(family, num_layers)
    vocab = len(tokenizer)
    if family == "llava":
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        text = LlamaConfig(
            vocab_size=vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
            tie_word_embeddings=False, **cfg["text"],
        )  # fmt: skip
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**cfg["vision"]),
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(IMAGE_PX // cfg["vision"]["patch_size"]) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=cfg["vision_feature_layer"],
            projector_hidden_act="gelu",
        )
        model = LlavaForConditionalGeneration(config)
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        t = dict(cfg["text"])
        rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"), "mrope_section": t.pop("mrope_section")}
        text = dict(
            vocab_size=vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
            rope_parameters=rope, **t,
        )  # fmt: skip
        vision = dict(cfg["vision"], hidden_size=cfg["text"]["hidden_size"], in_channels=3)
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        do_sample=False, max_new_tokens=4,
    )  # fmt: skip
    return model


def model_config(family: str, num_layers: int | None = None) -> dict:
    """MODELS[family] with the decoder depth set to `num_layers` (when given)."""
    cfg = json.loads(json.dumps(MODELS[family]))
    if num_layers is not None:
        cfg["text"]["num_hidden_layers"] = num_layers
    return cfg


def load_init(path: str, family: str, device: torch.device) -> dict:
    """What --init-from names: a work-dir checkpoint (.pt, with the auxiliary heads) or a saved model folder
    (e.g. the shipped `vlm_prune/demo_models/<family>`, without heads). Returns model state, heads state or
    None, the decoder depth and the expansion record the checkpoint came with (None if not expanded)."""
    p = Path(path)
    if p.is_dir():
        model, proc = load_model(p, dtype=torch.float32, device=device)
        shipped_vocab = proc.tokenizer.get_vocab()
        if shipped_vocab != build_tokenizer(family).get_vocab():
            raise RuntimeError(f"the tokenizer in {p} differs from the one this script builds; retrain from scratch")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"model": state, "heads": None, "layers": model.config.text_config.num_hidden_layers,
                "expansion": None}  # fmt: skip
    state = torch.load(p, map_location=device)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in state["model"] if "language_model.layers." in k}
    return {"model": state["model"], "heads": state["heads"], "layers": max(layers) + 1,
            "expansion": state.get("expansion")}  # fmt: skip


# ------------------------------------------------------------------------------------------------ batches
TOKEN_PX = 8  # both models: one visual token per 8x8 pixels (LLaVA patch 8; Qwen2-VL patch 4 x merge 2)


class Stream:
    """Train mosaics + questions drawn with the rules of `make_mosaics`; tensors built on `device`."""

    def __init__(self, family: str, processor, device: torch.device, seed: int):
        self.family, self.processor, self.device = family, processor, device
        self.tok = processor.tokenizer
        self.grid = TRAIN["grid"]
        self.cells = M.load_cells("train")
        self.pixels = torch.from_numpy(M.load_cell_pixels("train")).to(device)  # (N, 64, 64, 3) uint8
        self.shape_of = torch.tensor([M.SHAPES.index(c.shape) for c in self.cells], device=device)
        self.color_of = torch.tensor([M.COLORS.index(c.color) for c in self.cells], device=device)
        self.fg = foreground_blocks(self.pixels)  # (N, 8, 8): which 8x8 blocks of each image show the shape
        self.rng = random.Random(f"train-stream/{family}/{seed}")
        w = TRAIN["qtype_weights"]
        self.qtypes, self.qweights = list(w), list(w.values())
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
        self.scale = float(ip.rescale_factor)
        self.image_token_id = self.tok.convert_tokens_to_ids(processor.image_token)
        self.eos = self.tok.eos_token_id
        self.answer_ids: dict[str, int] = {}
        self.suffix_cache: dict[str, list[int]] = {}
        words = {"top", "middle", "bottom", "left", "right", *M.SHAPES, *(s + "s" for s in M.SHAPES), *M.COLORS}
        self.key_word_ids = {self.tok.convert_tokens_to_ids(w) for w in words}
        self.attribute_ids = {self.tok.convert_tokens_to_ids(w) for w in (*M.SHAPES, *M.COLORS)}
        # the prompt prefix (text + image tokens) shared by every question, from the processor itself
        probe = M.compose_mosaic(self.cells[: self.grid**2], self.grid)
        qs = ["what color is the shape in the middle?", "is there a circle in the top left?", "how many circles?"]
        prompts = [build_prompt(processor, q) for q in qs]
        enc = processor(text=prompts, images=[probe] * 3, return_tensors="pt", padding=True)
        full = [enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() for i in range(3)]
        n = 0
        while all(len(f) > n and f[n] == full[0][n] for f in full):
            n += 1
        self.prefix = full[0][:n]
        self.n_visual = self.prefix.count(self.image_token_id)
        pos = [i for i, t in enumerate(self.prefix) if t == self.image_token_id]
        self.visual_pos = torch.tensor(pos, device=device)
        self.has_mm_types = "mm_token_type_ids" in enc
        self.token_cell = self.cell_map(self.grid)
        assert self.n_visual == len(self.token_cell), (self.n_visual, len(self.token_cell))

    # -- pieces
    def cell_map(self, grid: int) -> torch.Tensor:
        """Cell index (row-major) of every visual token of a grid x grid mosaic."""
        side = grid * M.CELL_PX // TOKEN_PX
        per = M.CELL_PX // TOKEN_PX
        r, c = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
        return ((r // per) * grid + c // per).to(self.device)

    def draw_layout(self, grid: int) -> list[int]:
        return self.rng.sample(range(len(self.cells)), grid * grid)

    def draw_question(self, idx: list[int]) -> tuple[M.QuestionSpec, str]:
        cells = [self.cells[i] for i in idx]
        qtype = self.rng.choices(self.qtypes, self.qweights)[0]
        spec = M.sample_question(self.rng, cells, self.grid, qtype)
        return spec, spec.answer(cells)

    def suffix_ids(self, question: str) -> list[int]:
        ids = self.suffix_cache.get(question)
        if ids is None:
            text = build_prompt(self.processor, question)
            text = text.replace(self.processor.image_token, self.processor.image_token * self.n_visual, 1)
            full = self.tok(text)["input_ids"]
            assert full[: len(self.prefix)] == self.prefix, "the prompt prefix depends on the question"
            ids = self.suffix_cache[question] = full[len(self.prefix) :]
        return ids

    def answer_token(self, answer: str) -> int:
        if answer not in self.answer_ids:
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (answer, ids)
            self.answer_ids[answer] = ids[0]
        return self.answer_ids[answer]

    def pixel_inputs(self, idx: torch.Tensor, grid: int) -> dict:
        """Processor-equivalent pixel inputs for mosaics given as (B, grid*grid) cell indices."""
        g, c = grid, M.CELL_PX
        tiles = self.pixels[idx.to(self.device)]  # (B, g*g, 64, 64, 3)
        b = tiles.shape[0]
        img = tiles.view(b, g, g, c, c, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * c, g * c)
        x = (img.float() * self.scale - self.mean) / self.std
        if self.family == "llava":
            return {"pixel_values": x}
        ip = self.processor.image_processor
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        gh, gw = x.shape[2] // p, x.shape[3] // p
        x = x.view(b, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)
        pv = x.reshape(b * gh * gw, 3 * t * p * p)
        return {"pixel_values": pv, "image_grid_thw": torch.tensor([[1, gh, gw]] * b, device=self.device)}

    def token_fg(self, idx: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, T) bool: the visual token's 8x8 block shows (part of) its cell's shape."""
        side, per = grid * M.CELL_PX // TOKEN_PX, M.CELL_PX // TOKEN_PX
        t = torch.arange(side * side, device=self.device)
        r, c = t // side, t % side
        img = idx.to(self.device)[:, self.cell_map(grid)]
        return self.fg[img, r % per, c % per]

    def dense_targets(self, idx: torch.Tensor, grid: int) -> dict:
        """Dense targets: each cell's shape (from its shape tokens' mean feature), each shape token's colour,
        shape-or-background per token, and (LLaVA, whose ViT has absolute positions) each token's cell."""
        cell = self.cell_map(grid)
        img = idx.to(self.device)[:, cell]  # (B, T) image index of each token's cell
        fg = self.token_fg(idx, grid)
        # shape: scored on the mean feature of each cell's shape tokens (one 8x8 block rarely shows a shape;
        # the answer token's attention reads that mean); colour: on every shape token
        n_cells = grid * grid
        pool = (cell.unsqueeze(0) == torch.arange(n_cells, device=self.device).unsqueeze(1)).unsqueeze(0)
        pool = (pool & fg.unsqueeze(1)).float()  # (B, cells, T)
        pool = pool / pool.sum(-1, keepdim=True).clamp(min=1)
        idx = idx.to(self.device)
        out = {"shape": (self.shape_of[idx], pool), "color": (self.color_of[img], fg), "fg": (fg.long(), None)}
        if self.family == "llava":  # absolute position embeddings: the token can know its cell
            out["cell"] = (cell.expand_as(img), None)
        return out

    # -- joint batch
    def joint_batch(self, n_mosaics: int, n_questions: int) -> dict:
        layouts = [self.draw_layout(self.grid) for _ in range(n_mosaics)]
        idx = torch.tensor(layouts)
        rows = []
        for lay in layouts:
            rows += [self.draw_question(lay) for _ in range(n_questions)]
        seqs, labs, qpos, cellq, ans_ids, qtypes, keyw, attr = [], [], [], [], [], [], [], []
        for spec, ans in rows:
            q = self.suffix_ids(spec.text(self.grid))
            a = [self.answer_token(ans), self.eos]
            seqs.append(q + a)
            labs.append([-100] * len(q) + a)
            qpos.append(len(q) - 1)
            attr.append(next((j for j, t in enumerate(q) if t in self.attribute_ids), 0))
            keyw.append([t in self.key_word_ids for t in q + a])
            cellq.append(spec.cell if spec.qtype in M.CELL_QTYPES else -1)
            ans_ids.append(a[0])
            qtypes.append(spec.qtype)
        width = max(map(len, seqs))
        n = len(seqs)
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        lab = torch.full((n, width), -100, dtype=torch.long)
        kw = torch.zeros((n, width), dtype=torch.bool)
        for i, (s, lb) in enumerate(zip(seqs, labs, strict=True)):  # right padding after a shared prefix
            kw[i, : len(s)] = torch.tensor(keyw[i])
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab[i, : len(s)] = torch.tensor(lb)
        d = self.device
        return {
            "idx": idx,
            "pixels": self.pixel_inputs(idx, self.grid),
            "dense": self.dense_targets(idx, self.grid),
            "suffix_ids": ids.to(d),
            "suffix_mask": mask.to(d),
            "labels": lab.to(d),
            "qpos": torch.tensor(qpos, device=d),
            "cell": torch.tensor(cellq, device=d),
            "key_words": kw.to(d),
            "attr_pos": torch.tensor(attr, device=d),
            "is_yesno": torch.tensor([q == "yesno" for q in qtypes], device=d),
            "is_yes": torch.tensor([(sp.qtype == "yesno" and a == "yes") for sp, a in rows], device=d),
            "answer_ids": torch.tensor(ans_ids, device=d),
            "qtypes": qtypes,
            "n_questions": n_questions,
        }


# ------------------------------------------------------------------------------------------------ model io
def projector_module(model, family: str):
    return model.model.multi_modal_projector if family == "llava" else model.model.visual.merger


def vision_forward(model, family: str, pixels: dict) -> None:
    """Run the vision tower + projector only (their output is caught by the projector hook)."""
    if family == "llava":
        model.model.get_image_features(
            pixel_values=pixels["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    else:
        model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def shared_prefix_forward(model, stream: Stream, batch: dict, output_attentions: bool = True):
    """Prefix (text + image) once per mosaic, then every question as a suffix on its repeated KV cache."""
    family, d = stream.family, stream.device
    n_mos = batch["idx"].shape[0]
    k = batch["n_questions"]
    prefix = torch.tensor(stream.prefix, device=d).expand(n_mos, -1)
    p = prefix.shape[1]
    kw = dict(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **batch["pixels"])
    if stream.has_mm_types:
        kw["mm_token_type_ids"] = (prefix == stream.image_token_id).long()
    out1 = model(**kw, logits_to_keep=1)
    cache = _cache_of(out1)
    for layer in cache.layers:
        layer.batch_repeat_interleave(k)
    ids, smask = batch["suffix_ids"], batch["suffix_mask"]
    n, s = ids.shape
    if family == "llava":
        pos = (p + torch.arange(s, device=d)).expand(n, s)
    else:  # text after the image continues from the prefix's last M-RoPE position
        start = p + int(model.model.rope_deltas.view(-1)[0])
        pos = (start + torch.arange(s, device=d)).view(1, 1, s).expand(3, n, s)
    mask = torch.cat([torch.ones(n, p, dtype=smask.dtype, device=d), smask], dim=1)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, labels=batch["labels"],
        output_attentions=output_attentions, **{cache_kw: cache},
    )  # fmt: skip


@torch.no_grad()
def check_shared_prefix(model, stream: Stream) -> float:
    """Max |logit difference| between the shared-prefix path and a plain processor forward."""
    was = model.training
    model.eval()
    batch = stream.joint_batch(1, 3)
    out = shared_prefix_forward(model, stream, batch, output_attentions=False)
    cells = [stream.cells[i] for i in batch["idx"][0].tolist()]
    image = M.compose_mosaic(cells, stream.grid)
    worst = 0.0
    for r in range(3):
        ids = batch["suffix_ids"][r][batch["suffix_mask"][r].bool()].tolist()
        text = stream.tok.decode(ids[:-2], skip_special_tokens=False)  # the question part of the prompt
        texts = [s.text(stream.grid) for s in M.question_specs(stream.grid)]
        q = [t for t in texts if stream.suffix_ids(t) == ids[:-2]]
        assert q, text
        enc = stream.processor(text=[build_prompt(stream.processor, q[0])], images=[image], return_tensors="pt")
        enc = enc.to(stream.device)
        ref = model(**enc).logits[0, -1]
        got = out.logits[r, batch["qpos"][r]]
        worst = max(worst, (ref - got).abs().max().item())
    model.train(was)
    return worst


# --------------------------------------------------------------------------------------------- training
_STOP = {"flag": False}


def _on_signal(signum, frame):  # SIGUSR1: end the current stage after this step
    _STOP["flag"] = True


def _masked_nll(mass: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """-log(attention mass on the target), averaged over the selected rows (0 when none)."""
    if not bool(rows.any()):
        return torch.zeros((), device=mass.device)
    return -torch.log(mass[rows] + 1e-6).mean()


def lr_at(step: int, total: int, base: float, warm: int) -> float:
    if step < warm:
        return base * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    lo = TRAIN["min_lr_ratio"]
    return base * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


def foreground_blocks(pixels: torch.Tensor, threshold: int = 40, min_fraction: float = 0.1) -> torch.Tensor:
    """(N, 8, 8) bool from (N, 64, 64, 3) uint8 cells: blocks where >= 10% of pixels differ from the
    background (the median of the four corner pixels) by more than `threshold` in some channel."""
    px = pixels.int()
    corners = torch.stack([px[:, 0, 0], px[:, 0, -1], px[:, -1, 0], px[:, -1, -1]], 1)
    bg = corners.median(dim=1).values
    fg = (px - bg[:, None, None, :]).abs().amax(-1) > threshold
    n, per = px.shape[0], M.CELL_PX // TOKEN_PX
    return fg.view(n, per, TOKEN_PX, per, TOKEN_PX).float().mean((2, 4)) >= min_fraction


def make_heads(hidden: int, family: str, device) -> torch.nn.ModuleDict:
    heads = {
        "shape": torch.nn.Linear(hidden, len(M.SHAPES)),
        "color": torch.nn.Linear(hidden, len(M.COLORS)),
        "fg": torch.nn.Linear(hidden, 2),
    }
    if family == "llava":
        heads["cell"] = torch.nn.Linear(hidden, TRAIN["grid"] ** 2)
    return torch.nn.ModuleDict(heads).to(device)


def dense_loss(heads, feats: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
    feats = feats.float()
    parts = {}
    for k, (t, mask) in targets.items():
        if k == "shape":  # mask: (B, cells, T) pooling weights
            logits = heads[k](torch.einsum("bct,bth->bch", mask, feats))
        else:
            logits = heads[k](feats)
            if mask is not None:
                logits, t = logits[mask], t[mask]
        parts[k] = F.cross_entropy(logits.flatten(0, -2), t.flatten())
    return sum(parts.values()), {f"dense_{k}": v.item() for k, v in parts.items()}


def run_stage(name, steps, minutes, params, step_fn, cfg, history, log, on_step=None) -> int:
    """Generic loop: AdamW + warmup/cosine; `steps` an int or None (then calibrated to `minutes`)."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=TRAIN["betas"], weight_decay=TRAIN["weight_decay"])
    total = steps
    calib_at, calib_n = 3, 8
    t0 = time.time()
    step = 0
    _STOP["flag"] = False
    while (total is None or step < total) and not _STOP["flag"]:
        if total is None and step == calib_at:
            t_cal = time.time()
        if total is None and step == calib_at + calib_n:
            per = (time.time() - t_cal) / calib_n
            total = max(step + 1, int((minutes * 60 - (time.time() - t0)) / per) + step)
            log(f"{name}: {per:.2f} s/step -> {total} steps")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total if total is not None else 10**6, cfg["lr"], cfg["warmup"]) * g.get("lr_mult", 1)
        loss, parts = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], TRAIN["grad_clip"])
        opt.step()
        step += 1
        if on_step is not None:
            on_step(step)
        if step % TRAIN["log_every"] == 0 or step == 1:
            history.append({"stage": name, "step": step, "t": round(time.time() - t0, 1),
                            "lr": opt.param_groups[0]["lr"], **parts})  # fmt: skip
        if step % (TRAIN["log_every"] * 10) == 0 or step == 1:
            log(f"{name} {step}/{total} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" ({time.time() - t0:.0f}s)")  # fmt: skip
    return step


def train_one(family: str, args) -> dict:
    seed = args.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device(args.device)
    log = lambda msg: print(f"[{family}] {msg}", flush=True)
    tokenizer = build_tokenizer(family)
    processor = build_processor(family, tokenizer)
    init = load_init(args.init_from, family, device) if args.init_from else None
    num_layers, expansion = (init["layers"], init["expansion"]) if init else (None, None)
    if args.expand_layers and init is None:
        raise RuntimeError("--expand-layers needs --init-from (a saved model folder or a .pt checkpoint)")
    if args.expand_layers and args.expand_layers != init["layers"]:
        plan = expansion_plan(init["layers"], args.expand_layers)
        init["model"] = expand_state_dict(init["model"], plan)
        expansion = {"from_layers": init["layers"], "to_layers": args.expand_layers, "source": args.init_from,
                     "plan": [[src, orig] for src, orig in plan], "previous": expansion}  # fmt: skip
        num_layers = args.expand_layers
    retrieval_layer, yesno_layer = RETRIEVAL_LAYER, YESNO_LAYER
    if expansion is not None:
        plan = [(src, orig) for src, orig in expansion["plan"]]
        retrieval_layer, yesno_layer = mapped_layer(plan, RETRIEVAL_LAYER), mapped_layer(plan, YESNO_LAYER)
        log(f"decoder expanded {expansion['from_layers']} -> {expansion['to_layers']} layers; attention losses on "
            f"layers 0 (key words), {retrieval_layer} (cell), {yesno_layer} (yes/no)")  # fmt: skip
    model = build_model(family, tokenizer, num_layers).to(device)
    model.set_attn_implementation({"text_config": "eager"})  # the attention loss reads attention weights
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.3f}M parameters, vocab {len(tokenizer)}, device {device}")
    stream = Stream(family, processor, device, seed)
    hidden = model.config.text_config.hidden_size
    heads = make_heads(hidden, family, device)
    caught = {}
    hook = projector_module(model, family).register_forward_hook(lambda m, i, o: caught.__setitem__("feats", o))
    checks = {"n_visual_tokens": stream.n_visual, "prefix_tokens": len(stream.prefix)}
    history: list[dict] = []
    t_start = time.time()
    w = TRAIN["loss_weights"]

    # stage 1: vision tower + projector with the dense loss
    vcfg = dict(TRAIN["vision"])
    vgrid = vcfg["grid"][family]
    vision_params = [p for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n]

    def vision_step():
        idx = torch.tensor([stream.draw_layout(vgrid) for _ in range(vcfg["batch"])])
        vision_forward(model, family, stream.pixel_inputs(idx, vgrid))
        feats = caught["feats"].view(idx.shape[0], -1, hidden)
        loss, parts = dense_loss(heads, feats, stream.dense_targets(idx, vgrid))
        return loss, {"dense": loss.item(), **parts}

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    def checkpoint(tag: str, step: int, suffix: str = "") -> None:
        state = {"model": model.state_dict(), "heads": heads.state_dict(), "stage": tag, "step": step,
                 "expansion": expansion}  # fmt: skip
        torch.save(state, work / f"{family}_{tag}{suffix}.pt")

    if init is not None:
        state = init
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or any(".layers." not in k for k in missing):
            raise RuntimeError(f"checkpoint does not fit: missing {missing}, unexpected {unexpected}")
        for name, prm in model.named_parameters():  # decoder layers the checkpoint lacks start as identity
            if name in missing and name.endswith(("o_proj.weight", "down_proj.weight")):
                torch.nn.init.zeros_(prm)
        if missing:
            new = sorted({k.split(".layers.")[1].split(".")[0] for k in missing})
            log(f"new decoder layers start as identity: {new}")
        if state["heads"] is not None:
            heads.load_state_dict(state["heads"])
        log(f"initialised from {args.init_from}")
    model.train()
    h_steps = 0
    if init is not None and init["heads"] is None and args.heads_steps:
        # a saved model folder has no auxiliary heads: fit fresh ones on the frozen tower's features first, so
        # that their random start does not push the trained tower around

        def heads_step():
            idx = torch.tensor([stream.draw_layout(vgrid) for _ in range(vcfg["batch"])])
            with torch.no_grad():
                vision_forward(model, family, stream.pixel_inputs(idx, vgrid))
            feats = caught["feats"].view(idx.shape[0], -1, hidden)
            loss, parts = dense_loss(heads, feats, stream.dense_targets(idx, vgrid))
            return loss, {"dense": loss.item(), **parts}

        h_steps = run_stage("heads", args.heads_steps, None, list(heads.parameters()), heads_step, vcfg, history,
                            log)  # fmt: skip
    v_steps = run_stage("vision", args.vision_steps, args.vision_minutes,
                        vision_params + list(heads.parameters()), vision_step, vcfg, history, log)  # fmt: skip
    if v_steps:
        checkpoint("vision", v_steps)

    # stage 2: everything, several questions per mosaic on a shared prefix
    jcfg = dict(TRAIN["joint"])
    jcfg["lr"] *= args.lr_scale
    if args.joint_mosaics:
        jcfg["mosaics"] = args.joint_mosaics
    checks["shared_prefix_max_logit_diff"] = check_shared_prefix(model, stream)
    log(f"checks: {checks}")
    if checks["shared_prefix_max_logit_diff"] > 1e-3:
        raise RuntimeError(f"shared-prefix training path differs from the plain forward: {checks}")
    running: dict[str, list] = {q: [] for q in M.QTYPES}

    def joint_step():
        b = stream.joint_batch(jcfg["mosaics"], jcfg["questions"])
        out = shared_prefix_forward(model, stream, b)
        rows = torch.arange(b["qpos"].shape[0], device=device)
        feats = caught["feats"].view(b["idx"].shape[0], -1, hidden)
        l_dense, dparts = dense_loss(heads, feats, b["dense"])
        # head 0 of the first layer: the answer token gathers the question's key words
        p = len(stream.prefix)
        att0 = out.attentions[0][rows, 0, b["qpos"], p:].float()  # (n, S)
        l_att0 = -torch.log((att0 * b["key_words"]).sum(-1) + 1e-6).mean()
        # head 0 of layer 2: the answer token looks at the asked cell
        att = out.attentions[retrieval_layer][rows, 0, b["qpos"], :p].float()  # (n, P)
        is_cell = b["cell"] >= 0
        # target: the visual tokens of the asked cell that show its shape
        tok_cell = torch.full((p,), -2, device=device)
        tok_cell[stream.visual_pos] = stream.token_cell
        fg = torch.zeros((b["idx"].shape[0], p), dtype=torch.bool, device=device)
        fg[:, stream.visual_pos] = b["dense"]["fg"][0].bool()
        fg = fg.repeat_interleave(b["n_questions"], dim=0)
        target = (tok_cell.unsqueeze(0) == b["cell"].unsqueeze(1)) & fg
        l_att = _masked_nll((att * target).sum(-1), is_cell)
        # head 1 of layer 3, yes/no questions: the answer token, which has read the cell in layer 2, attends to
        # the question's attribute word ("triangle", "red") when the cell shows it (yes) and to the first
        # prompt token, an attention sink, when it does not (no). The query-key product compares what was
        # read with the word; an MLP alone never learned that comparison (1450 steps at chance).
        att1 = out.attentions[yesno_layer][rows, 1, b["qpos"], :].float()  # (n, P + S)
        exist = torch.zeros_like(att1, dtype=torch.bool)
        exist[rows, torch.where(b["is_yes"], p + b["attr_pos"], torch.zeros_like(b["qpos"]))] = True
        l_exist = _masked_nll((att1 * exist).sum(-1), b["is_yesno"])
        l_attn = l_att + l_att0 + args.yesno_attention * l_exist
        loss = w["answer"] * out.loss + w["dense"] * l_dense + w["attention"] * l_attn
        pred = out.logits[rows, b["qpos"]].argmax(-1)
        ok = (pred == b["answer_ids"]).tolist()
        for q, o in zip(b["qtypes"], ok, strict=True):
            running[q] = (running[q] + [o])[-300:]
        parts = {"loss": loss.item(), "answer": out.loss.item(), "dense": l_dense.item(), "attention": l_att.item(),
                 "attention_words": l_att0.item(), "attention_yesno": l_exist.item(), **dparts}  # fmt: skip
        parts.update({f"acc_{q}": sum(v) / len(v) for q, v in running.items() if v})
        return loss, parts

    # the yes/no comparison lives in a small, input-dependent part of a large residual: the query/key
    # projections of that layer must grow much larger than the rest, so they get a larger learning rate
    fast = f"layers.{yesno_layer}.self_attn."
    fast_params = [p for n, p in model.named_parameters() if "language_model" in n and fast in n and "o_proj" not in n]
    fast_ids = {id(p) for p in fast_params}
    all_params = [
        {"params": [p for p in model.parameters() if id(p) not in fast_ids] + list(heads.parameters())},
        {"params": fast_params, "lr_mult": jcfg["yesno_lr_mult"]},
    ]
    val = M.make_mosaics("test", args.val_n, seed=VAL_SEED, qtypes=M.CELL_QTYPES) if args.val_every else []
    val_history: list[dict] = []

    def joint_on_step(st: int) -> None:
        if st % 50 == 0:
            checkpoint("joint", st)
        if args.val_every and st % args.val_every == 0:
            # monitoring only: held-out mosaics of another seed than the final test set (eval_seed); every
            # validated state is kept, so a run stopped by SIGUSR1 can ship the last state that passed
            model.eval()
            with torch.no_grad():
                r = evaluate(model, processor, val, batch_size=16, progress=False)
            model.train()
            row = {"step": st, "t": round(time.time() - t_start, 1),
                   **{q: v["accuracy"] for q, v in r["per_qtype"].items()}}  # fmt: skip
            val_history.append(row)
            checkpoint("joint", st, suffix=f"_val{st}")
            log(f"val {args.val_n} (seed {VAL_SEED}) at joint step {st}: "
                + ", ".join(f"{q} {v['accuracy']:.3f}" for q, v in r["per_qtype"].items()))  # fmt: skip

    j_steps = run_stage("joint", args.joint_steps, args.joint_minutes, all_params, joint_step, jcfg, history, log,
                        on_step=joint_on_step)  # fmt: skip
    checkpoint("joint", j_steps)
    hook.remove()
    train_s = time.time() - t_start

    # save fp16 + processor, then reload the saved folder the way users do, and evaluate
    save = Path(args.save_dir) / family
    save.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.set_attn_implementation("sdpa")
    model.to(torch.float16).save_pretrained(save)
    processor.save_pretrained(save)
    complete_processor_config(save, family)
    del model
    model, proc2 = load_model(save, dtype=torch.float32, device=device)
    bs = 64 if device.type == "cuda" else 16
    samples = M.make_mosaics("test", args.eval_n, seed=TRAIN["eval_seed"], grid=TRAIN["grid"])
    t1 = time.time()
    res = evaluate(model, proc2, samples, batch_size=bs, progress=False)
    eval_s = time.time() - t1
    small = M.make_mosaics("test", 40, seed=0, qtypes=M.CELL_QTYPES)
    res_small = evaluate(model, proc2, small, batch_size=bs, progress=False)
    res.pop("predictions")
    res_small.pop("predictions")
    size = sum(f.stat().st_size for f in save.iterdir() if f.is_file())
    import transformers

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "model": family,
        "class": type(model).__name__,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "visual_tokens_per_mosaic": stream.n_visual,
        "checkpoint_bytes": size,
        "stages": {
            "heads": {"steps": h_steps, "batch": vcfg["batch"], "grid": vgrid},
            "vision": {"steps": v_steps, "batch": vcfg["batch"], "grid": vgrid},
            "joint": {"steps": j_steps, "mosaics": jcfg["mosaics"], "questions_per_mosaic": jcfg["questions"]},
        },
        "questions_seen": j_steps * jcfg["mosaics"] * jcfg["questions"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "device": dev_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "checks": checks,
        "init_from": args.init_from,
        "yesno_attention": args.yesno_attention,
        "expansion": expansion,
        "lr_scale": args.lr_scale,
        "validation": {"n": args.val_n, "seed": VAL_SEED, "every": args.val_every, "history": val_history}
        if args.val_every else None,
        "attention_loss_layers": {"key_words": 0, "cell": retrieval_layer, "yesno": yesno_layer},
        "train_config": json.loads(json.dumps(TRAIN)),
        "model_config": model_config(family, num_layers),
        "eval": {"split": "test", "n": args.eval_n, "seed": TRAIN["eval_seed"], **res},
        "eval_small_cell40": res_small,
        "loss_history": history,
    }  # fmt: skip
    log(f"{args.eval_n} test mosaics: " + ", ".join(f"{q} {v['accuracy']:.3f}" for q, v in res["per_qtype"].items())
        + f"; cell {res['cell_accuracy']:.3f}; 40-cell sample {res_small['accuracy']:.3f}")  # fmt: skip
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"demo_{family}_train.json").write_text(json.dumps(report, indent=1))
    plot_loss(history, out / f"demo_{family}_loss.png", family)
    return report


def complete_processor_config(save: Path, family: str) -> None:
    """Give a Qwen2-VL processor saved without torchvision the video-processor entry transformers expects."""
    f = save / "processor_config.json"
    if family != "qwen2_vl" or not f.is_file():
        return
    cfg = json.loads(f.read_text())
    if cfg.get("video_processor"):
        return
    ip = cfg["image_processor"]
    cfg["video_processor"] = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": False, "image_mean": ip["image_mean"], "image_std": ip["image_std"],
        "max_frames": 768, "min_frames": 4, "merge_size": ip["merge_size"], "patch_size": ip["patch_size"],
        "resample": ip.get("resample", 3), "rescale_factor": ip["rescale_factor"], "return_metadata": False,
        "size": dict(ip["size"]), "temporal_patch_size": ip["temporal_patch_size"],
        "video_processor_type": "Qwen2VLVideoProcessor", "max_video_tokens": 128000,
    }  # fmt: skip
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def plot_loss(history, path: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [st for st in ("vision", "joint") if any(h["stage"] == st for h in history)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, st in zip(axes[0], stages, strict=False):
        rows = [h for h in history if h["stage"] == st]
        keys = ["dense"] if st == "vision" else ["answer", "dense", "attention", "attention_yesno"]
        for key in keys:
            if key in rows[0]:
                ax.plot([h["step"] for h in rows], [max(h[key], 1e-5) for h in rows], lw=1, label=key)
        ax.set_title(f"{family}: {st} stage")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results_dir: Path) -> Path:
    """benchmarks/results/demo_models.md from the per-model JSON files present."""
    rows = []
    for family in MODELS:
        f = results_dir / f"demo_{family}_train.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    qtypes = list(M.QTYPES)
    lines = [
        "# Embedded demo models",
        "",
        "Two small Hugging Face VLMs trained from scratch by `benchmarks/train_demo_models.py` on the mosaic",
        "task (`docs/mosaic_task.md`) and shipped in fp16 under `vlm_prune/demo_models/`. Accuracy: greedy",
        "generation, exact match, unpruned, on held-out test mosaics (test easy-VQA images only), after",
        "reloading the saved fp16 checkpoint in float32 through AutoProcessor / AutoModelForImageTextToText.",
        "",
        "| model | class | params | visual tokens | checkpoint | training | train time | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        st = r["stages"]
        if "lineage" in r:  # a chain of resumed runs (see the notes below): totals over all of them
            vision = sum(ph["steps"] for ph in r["lineage"] if ph["stage"] == "vision")
            joint = sum(ph["steps"] for ph in r["lineage"] if ph["stage"] == "joint")
            lines.append(
                f"| {r['model']} | `{r['class']}` | {r['parameters'] / 1e6:.2f} M | {r['visual_tokens_per_mosaic']} "
                f"| {r['checkpoint_bytes'] / 2**20:.1f} MiB | {len(r['lineage'])} resumed phases: vision {vision} x "
                f"{st['vision']['batch']} mosaics ({st['vision']['grid']}x{st['vision']['grid']}); joint {joint} x "
                f"{st['joint']['mosaics']} mosaics x {st['joint']['questions_per_mosaic']} questions "
                f"| {r['lineage_total_seconds'] / 60:.0f} min | {r['device']}, torch {r['versions']['torch']}, "
                f"transformers {r['versions']['transformers']} |"
            )
            continue
        lines.append(
            f"| {r['model']} | `{r['class']}` | {r['parameters'] / 1e6:.2f} M | {r['visual_tokens_per_mosaic']} "
            f"| {r['checkpoint_bytes'] / 2**20:.1f} MiB "
            f"| vision {st['vision']['steps']} x {st['vision']['batch']} mosaics ({st['vision']['grid']}x"
            f"{st['vision']['grid']}); joint {st['joint']['steps']} x {st['joint']['mosaics']} mosaics x "
            f"{st['joint']['questions_per_mosaic']} questions "
            f"| {r['train_seconds'] / 60:.0f} min | {r['device']}, torch {r['versions']['torch']}, "
            f"transformers {r['versions']['transformers']} |"
        )
    lines += [
        "",
        "| model | n | " + " | ".join(qtypes) + " | cell questions | all | 40 cell questions (test sample) |",
        "| --- | --- | " + " | ".join("---" for _ in qtypes) + " | --- | --- | --- |",
    ]
    for r in rows:
        e = r["eval"]
        per = " | ".join(f"{e['per_qtype'][q]['accuracy']:.3f}" if q in e["per_qtype"] else "-" for q in qtypes)
        lines.append(
            f"| {r['model']} | {e['n']} | {per} | {e['cell_accuracy']:.3f} | {e['accuracy']:.3f} "
            f"| {r['eval_small_cell40']['accuracy']:.3f} |"
        )
    lines += [
        "",
        f"Test set: `make_mosaics('test', n, seed={TRAIN['eval_seed']})`, question types cycling "
        "color / shape / yesno / count. The 40-question sample is `make_mosaics('test', 40, seed=0, "
        "qtypes=CELL_QTYPES)`, the one `tests/test_demo_models.py` uses.",
        "",
        "Loss curves: "
        + ", ".join(f"`demo_{r['model']}_loss.png`" for r in rows)
        + "; full configs, checks and loss histories: "
        + ", ".join(f"`demo_{r['model']}_train.json`" for r in rows)
        + ".",
        "",
    ]
    notes = results_dir / "demo_models_notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    path = results_dir / "demo_models.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*MODELS, "both"], default="both")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vision-steps", type=int, default=None, help="stage-1 steps (default: --vision-minutes)")
    ap.add_argument("--vision-minutes", type=float, default=10.0)
    ap.add_argument("--joint-steps", type=int, default=None, help="stage-2 steps (default: --joint-minutes)")
    ap.add_argument("--joint-minutes", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=TRAIN["seed"])
    ap.add_argument("--eval-n", type=int, default=TRAIN["eval_n"])
    ap.add_argument("--save-dir", default=str(ROOT / "vlm_prune" / "demo_models"))
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "results" / "tmp"), help="checkpoints")
    ap.add_argument("--init-from", default=None,
                    help="start from a checkpoint of --work-dir (.pt) or a saved model folder")  # fmt: skip
    ap.add_argument("--expand-layers", type=int, default=None,
                    help="grow the --init-from decoder to this many layers, new ones starting as identity "
                         "(benchmarks/demo_depth.py)")  # fmt: skip
    ap.add_argument("--heads-steps", type=int, default=150,
                    help="steps fitting new auxiliary heads if --init-from is a model folder")  # fmt: skip
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiplies the joint stage's learning rates (fine-tuning an initialised model)")  # fmt: skip
    ap.add_argument("--yesno-attention", type=float, default=1.0,
                    help="relative weight of the yes/no attention loss (0 turns it off)")  # fmt: skip
    ap.add_argument("--joint-mosaics", type=int, default=None,
                    help="mosaics per joint step (default: the recipe's); fewer makes a step cheaper")  # fmt: skip
    ap.add_argument("--val-every", type=int, default=0,
                    help="every K joint steps, greedy accuracy on --val-n held-out cell questions (seed "
                         f"{VAL_SEED}, not the final test set); each validated state is kept in --work-dir",
                    )  # fmt: skip
    ap.add_argument("--val-n", type=int, default=48)
    ap.add_argument("--report-only", action="store_true", help="only rewrite demo_models.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGUSR1, _on_signal)
    if not args.report_only:
        for family in MODELS if args.model == "both" else [args.model]:
            train_one(family, args)
    print("wrote", write_markdown(Path(args.results_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

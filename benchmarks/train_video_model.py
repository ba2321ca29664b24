"""Train the embedded video demo model (`vlm_prune/demo_models/qwen2_vl_video`) on the video task.

    python benchmarks/train_video_model.py --steps 3000                 # train (resumes from --work-dir)
    python benchmarks/train_video_model.py --minutes 80                 # step count calibrated to 80 min
    python benchmarks/train_video_model.py --steps 2 --eval-n 10 --save-dir /tmp/v --results-dir /tmp/v \\
        --work-dir /tmp/v                                                # smoke test

Lineage: the model starts from the shipped image demo model `vlm_prune/demo_models/qwen2_vl` (trained by
`benchmarks/train_demo_models.py` on the mosaic task):
  * its vision tower + merger (they read easy-VQA shapes and colours; each temporal step of a video goes
    through them like one image), its token embeddings, final norm and lm_head (rows for the new words of the
    video task start at the mean row);
  * its 4 decoder layers become layers 2-5 of 8; layers 0, 1, 6, 7 are new and start as identity
    (o_proj / down_proj zero). Layers 0-1 are where the change between temporal steps is computed.
The tokenizer is the image model's word-level vocabulary with the video task's new words appended (ids of the
old words unchanged). The processor is the same Qwen2-VL processor at 64x64 px (a 2x2 board of 32 px cells:
8x8 merged tokens per temporal step, 256 per 8-frame clip) with a chat template that also places a video.

Training (one stage, the ideas of `benchmarks/results/demo_models.md`): train clips drawn on the fly with the
rules of `vlm_prune.tasks.video` from easy-VQA train images only; each step 4 clips x 6 questions on a shared
prefix (the prompt up to the end of the video runs once per clip and its KV cache is repeated per question,
checked against a plain forward at start). Losses:
  * answer: cross-entropy on the answer word and the end-of-turn token;
  * dense (vision): linear heads on the merger output predict each occupied cell's shape (mean over its
    shape tokens), each shape token's colour and shape-or-background per token;
  * previous step: in layer 0 head 1 every visual token of step t >= 1 attends to the token at the same place
    in step t - 1 (so that layer 0 can compare the two);
  * events: a linear head on the output of layer 1 says, per visual token, whether its cell had a shape
    appear / move in / change colour at this step, or was just left by a moving shape;
  * key words: in layer 2 head 0 the answer position attends to the question's key words;
  * retrieval: in layer 4 head 0 the answer position attends to the visual tokens that hold the answer: the
    asked cell at the first / last step, or the shape tokens of the event the question is about.
The auxiliary heads are not part of the saved model; inference is the plain HF model.

Reproducible and resumable: seeded (--seed); a checkpoint with model, heads, optimiser, data-stream state
and loss history goes to --work-dir every 50 steps and on SIGUSR1/SIGTERM; rerunning the same command
continues from it. The config, the step count and the loss history go to `demo_video_train.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_demo_models import (  # noqa: E402
    TRAIN as IMAGE_TRAIN,
)
from train_demo_models import (  # noqa: E402
    _cache_of,
    _masked_nll,
    complete_processor_config,
    lr_at,
    make_heads,
)
from video_train_report import markdown, plot_loss  # noqa: E402

from vlm_prune.data import mosaic as M  # noqa: E402
from vlm_prune.demo import demo_model_path, image_only_qwen2vl_processor, load_model  # noqa: E402
from vlm_prune.tasks import video as V  # noqa: E402

TRAIN = {
    "seed": 0,
    "clips": 4,
    "questions": 6,
    "lr": 2e-3,
    "warmup": 30,
    "weight_decay": IMAGE_TRAIN["weight_decay"],
    "betas": IMAGE_TRAIN["betas"],
    "grad_clip": IMAGE_TRAIN["grad_clip"],
    "loss_weights": {"answer": 1.0, "dense": 0.5, "prev": 0.3, "events": 0.5, "words": 0.3, "retrieval": 0.5},
    "event_none_weight": 0.1,
    "cell_px": 32,
    "eval_n": 500,  # held-out test clips, balanced over the 5 question types
    "eval_seed": 1234,
    "log_every": 10,
}
INIT_COMMIT = "89c05e1"  # the commit whose vlm_prune/demo_models/qwen2_vl the shipped video model started from
LAYER_SOURCES = [None, None, 0, 1, 2, 3, None, None]  # decoder layer i <- image model layer (None: new, identity)
PREV_LAYER, EVENT_LAYER, WORDS_LAYER, RETRIEVAL_LAYER = 0, 1, 2, 4
EVENTS = ("none", "appear", "move", "recolor", "vacated")
KEY_WORDS = ("top", "bottom", "left", "right", "start", "end", "appeared", "last", "moved", "changed")
TOKEN_PX = 8  # patch 4 x merge 2
CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------ tokenizer / processor
def build_tokenizer(image_dir: Path):
    """The image model's word-level tokenizer with the video task's new words appended."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads((image_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    new = [w for w in V.task_words() if w not in vocab]
    for w in new:
        vocab[w] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    cfg = json.loads((image_dir / "tokenizer_config.json").read_text())
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=cfg["pad_token"], unk_token=cfg["unk_token"], eos_token=cfg["eos_token"],
        padding_side="left",
    )  # fmt: skip
    hf.add_special_tokens({"additional_special_tokens": list(cfg["extra_special_tokens"])})
    hf.model_max_length = 2048
    return hf, new


def build_processor(tokenizer, frame_px: int, image_dir: Path):
    import transformers

    cfg = json.loads((image_dir / "processor_config.json").read_text())["image_processor"]
    kw = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class", "size")}
    kw["size"] = {"shortest_edge": frame_px * frame_px, "longest_edge": frame_px * frame_px}
    ip = transformers.Qwen2VLImageProcessorPil(**kw)
    return image_only_qwen2vl_processor(ip, tokenizer, CHAT)


# -------------------------------------------------------------------------------------------------- model
def build_model(tokenizer, new_words: list[str], image_dir: Path, log):
    """8-layer Qwen2-VL initialised from the image demo model (see the module docstring)."""
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    image, _ = load_model(image_dir)
    cfg = Qwen2VLConfig.from_dict(image.config.to_dict())
    cfg.text_config.num_hidden_layers = len(LAYER_SOURCES)
    cfg.text_config.layer_types = ["full_attention"] * len(LAYER_SOURCES)
    cfg.text_config.vocab_size = len(tokenizer)
    cfg.dtype = "float32"
    model = Qwen2VLForConditionalGeneration(cfg)
    src = image.state_dict()
    dst = model.state_dict()
    copied = 0
    for name in dst:
        if ".layers." in name and "language_model" in name:
            head, rest = name.split(".layers.")
            i, tail = rest.split(".", 1)
            s = LAYER_SOURCES[int(i)]
            if s is None:
                if tail in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                    dst[name].zero_()
                continue
            dst[name].copy_(src[f"{head}.layers.{s}.{tail}"])
        elif name in src and src[name].shape == dst[name].shape:
            dst[name].copy_(src[name])
        elif name in src:  # embedding / lm_head rows: old words keep their rows, new words start at the mean
            old = src[name]
            dst[name][: old.shape[0]] = old
            dst[name][old.shape[0] :] = old.mean(0)
        else:
            raise RuntimeError(f"no source for {name}")
        copied += 1
    model.load_state_dict(dst)
    log(f"initialised {copied} tensors from the image demo model; new words {new_words}")
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=4
    )
    return model


# ------------------------------------------------------------------------------------------------ batches
class Stream:
    """Train clips with several questions each, built as tensors for the shared-prefix forward."""

    def __init__(self, processor, seed: int, cell_px: int, frames_per_step: int = 2, repeat_recolored: int = 0):
        self.processor, self.tok = processor, processor.tokenizer
        self.cell_px, self.fps, self.repeat_recolored = cell_px, frames_per_step, repeat_recolored
        self.rng = random.Random(
            f"video-train-stream/{seed}" + ("" if frames_per_step == 2 else f"/fps{frames_per_step}")
        )
        self.settings = V.video_settings(processor)
        self.video_id = self.tok.convert_tokens_to_ids("<|video_pad|>")
        self.eos = self.tok.eos_token_id
        probe = V.make_clips("train", 3, seed=0, cell_px=cell_px, frames_per_step=frames_per_step)
        enc = V.video_inputs(processor, probe)
        full = [enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() for i in range(3)]
        n = 0
        while all(len(f) > n and f[n] == full[0][n] for f in full):
            n += 1
        self.prefix = full[0][:n]
        assert self.prefix[-1] == self.tok.convert_tokens_to_ids("<|vision_end|>"), "prefix must end at the video"
        self.visual_pos = torch.tensor([i for i, t in enumerate(self.prefix) if t == self.video_id])
        t, gh, gw = enc["video_grid_thw"][0].tolist()
        self.grid_thw = (t, gh, gw)
        m = self.settings.merge_size
        self.side = gh // m  # merged tokens per row of a step
        self.per_step = self.side * self.side
        assert len(self.visual_pos) == t * self.per_step
        self.steps_per_state = t // V.STEPS  # temporal grid steps per state (1 for 8 frames, 2 for 16)
        assert self.steps_per_state * V.STEPS == t
        r = torch.arange(self.per_step) // self.side
        c = torch.arange(self.per_step) % self.side
        per_cell = cell_px // TOKEN_PX
        self.token_cell = (r // per_cell) * 2 + c // per_cell  # (per_step,) cell of each token of a step
        self.suffix_cache: dict[str, list[int]] = {}
        self.key_ids = {self.tok.convert_tokens_to_ids(w) for w in KEY_WORDS}

    def suffix_ids(self, question: str) -> list[int]:
        ids = self.suffix_cache.get(question)
        if ids is None:
            text = V.build_video_prompt(self.processor, question)
            n_vis = len(self.visual_pos)
            full = self.tok(text.replace("<|video_pad|>", "<|video_pad|>" * n_vis, 1), add_special_tokens=False)
            full = full["input_ids"]
            assert full[: len(self.prefix)] == self.prefix, "the prompt prefix depends on the question"
            ids = self.suffix_cache[question] = full[len(self.prefix) :]
        return ids

    def questions(self, clip: V.VideoClip, k: int) -> list[tuple[str, int]]:
        qs = [(q, c) for q, c in V.answerable(clip) if c < 0]
        if ("recolored", -1) in qs:  # the hardest type can get extra weight (--repeat-recolored)
            qs += [("recolored", -1)] * self.repeat_recolored
        cell_types = ["start", "end"]
        while len(qs) < k:
            q = cell_types[len(qs) % 2]
            qs.append((q, V.sample_cell(self.rng, clip, q)))
        return qs[:k]

    def token_labels(self, clip: V.VideoClip, video: np.ndarray) -> dict:
        """Per visual token (temporal steps x per_step): fg, shape/colour of its cell, event class (on the
        first temporal step of the state an event leads to)."""
        steps = clip.states()
        fps = clip.frames_per_step
        frames = video[::fps].astype(np.int16)  # (states, H, W, 3) one frame per state
        bg = np.asarray(clip.background, dtype=np.int16)
        fgpx = np.abs(frames - bg).max(-1) > V.FG_THRESHOLD
        T, H, W = fgpx.shape
        fg = fgpx.reshape(T, H // TOKEN_PX, TOKEN_PX, W // TOKEN_PX, TOKEN_PX).mean((2, 4)) >= 0.1
        fg = torch.from_numpy(fg.reshape(T, -1))
        cell = self.token_cell.unsqueeze(0).expand(T, -1)
        shape = torch.full((T, 4), -100, dtype=torch.long)
        color = torch.full((T, 4), -100, dtype=torch.long)
        for t, board in enumerate(steps):
            for i, c in enumerate(board):
                if c is not None:
                    shape[t, i] = M.SHAPES.index(c.shape)
                    color[t, i] = M.COLORS.index(c.color)
        event = torch.zeros((T, self.per_step), dtype=torch.long)
        for ev in clip.events:
            here = (cell[ev.step] == ev.cell) & fg[ev.step]
            event[ev.step][here] = EVENTS.index(ev.kind)
            if ev.kind == "move":
                event[ev.step][(cell[ev.step] == ev.source) & fg[ev.step - 1]] = EVENTS.index("vacated")
        k = self.steps_per_state
        if k > 1:  # per temporal step: a state spans k steps; its event shows on the first one only
            fg, shape, color = (x.repeat_interleave(k, dim=0) for x in (fg, shape, color))
            event = torch.cat([event.unsqueeze(1), torch.zeros((T, k - 1, self.per_step), dtype=torch.long)], 1)
            event = event.flatten(0, 1)
        return {"fg": fg, "shape": shape, "color": color, "event": event}

    def target_tokens(self, clip: V.VideoClip, labels: dict, qtype: str, cell: int) -> torch.Tensor:
        """(T * per_step,) bool: the visual tokens holding the answer to (qtype, cell)."""
        k = self.steps_per_state
        T = len(clip.states()) * k
        tgt = torch.zeros((T, self.per_step), dtype=torch.bool)
        if qtype in ("start", "end"):
            t = 0 if qtype == "start" else T - 1
            in_cell = self.token_cell == cell
            fg = labels["fg"][t] & in_cell
            tgt[t] = fg if bool(fg.any()) else in_cell
        else:
            ev = [e for e in clip.events if e.kind == V.NEEDS_EVENT[qtype]][-1]
            in_cell = self.token_cell == ev.cell
            fg = labels["fg"][ev.step * k] & in_cell
            tgt[ev.step * k] = fg if bool(fg.any()) else in_cell
        return tgt.flatten()

    def batch(self, n_clips: int, k: int) -> dict:
        clips = [
            V.sample_clip(self.rng, "train", cell_px=self.cell_px, frames_per_step=self.fps) for _ in range(n_clips)
        ]
        videos = [c.video() for c in clips]
        pix = [V.preprocess_video(v, self.settings)[0] for v in videos]
        labels = [self.token_labels(c, v) for c, v in zip(clips, videos, strict=True)]
        seqs, labs, qpos, targets, qtypes, keyw, ans = [], [], [], [], [], [], []
        for clip, lab in zip(clips, labels, strict=True):
            for qtype, cell in self.questions(clip, k):
                q = self.suffix_ids(V.question_text(qtype, cell))
                a_ids = self.tok(V.answer(clip, qtype, cell), add_special_tokens=False)["input_ids"]
                assert len(a_ids) == 1
                a = [a_ids[0], self.eos]
                seqs.append(q + a)
                labs.append([-100] * len(q) + a)
                qpos.append(len(q) - 1)
                keyw.append([t in self.key_ids for t in q + a])
                targets.append(self.target_tokens(clip, lab, qtype, cell))
                qtypes.append(qtype)
                ans.append(a[0])
        width = max(map(len, seqs))
        n = len(seqs)
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        lab = torch.full((n, width), -100, dtype=torch.long)
        kw = torch.zeros((n, width), dtype=torch.bool)
        for i, (s, lb) in enumerate(zip(seqs, labs, strict=True)):  # right padding after the shared prefix
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab[i, : len(s)] = torch.tensor(lb)
            kw[i, : len(s)] = torch.tensor(keyw[i])
        return {
            "pixel_values_videos": torch.from_numpy(np.concatenate(pix)),
            "video_grid_thw": torch.tensor([self.grid_thw] * n_clips),
            "labels_fg": torch.stack([x["fg"] for x in labels]),  # (B, T, per_step)
            "labels_shape": torch.stack([x["shape"] for x in labels]),  # (B, T, 4)
            "labels_color": torch.stack([x["color"] for x in labels]),
            "labels_event": torch.stack([x["event"] for x in labels]),
            "suffix_ids": ids, "suffix_mask": mask, "labels": lab, "qpos": torch.tensor(qpos),
            "key_words": kw, "targets": torch.stack(targets), "qtypes": qtypes, "answer_ids": torch.tensor(ans),
            "n_questions": k,
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------- forward
def shared_prefix_forward(model, stream: Stream, b: dict, output_attentions: bool = True):
    """Prefix (prompt + video) once per clip, then every question as a suffix on its repeated KV cache.

    Returns (prefix output, suffix output)."""
    n_clips = b["video_grid_thw"].shape[0]
    k = b["n_questions"]
    prefix = torch.tensor(stream.prefix).expand(n_clips, -1)
    p = prefix.shape[1]
    out1 = model(
        input_ids=prefix, attention_mask=torch.ones_like(prefix), mm_token_type_ids=(prefix == stream.video_id) * 2,
        pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"], use_cache=True,
        output_attentions=output_attentions, output_hidden_states=output_attentions,
    )  # fmt: skip
    cache = _cache_of(out1)
    for layer in cache.layers:
        layer.batch_repeat_interleave(k)
    ids, smask = b["suffix_ids"], b["suffix_mask"]
    n, s = ids.shape
    start = p + int(model.model.rope_deltas.view(-1)[0])  # text after the video continues the M-RoPE positions
    pos = (start + torch.arange(s)).view(1, 1, s).expand(3, n, s)
    mask = torch.cat([torch.ones(n, p, dtype=smask.dtype), smask], dim=1)
    out2 = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
        labels=b["labels"], output_attentions=output_attentions,
    )  # fmt: skip
    return out1, out2


@torch.no_grad()
def check_shared_prefix(model, stream: Stream) -> float:
    """Max |logit difference| at the answer position between the shared-prefix path and a plain forward."""
    was = model.training
    model.eval()
    rng_state = stream.rng.getstate()
    stream.rng = random.Random("check")
    b = stream.batch(1, 3)
    _, out = shared_prefix_forward(model, stream, b, output_attentions=False)
    worst = 0.0
    prefix = stream.prefix
    for r in range(3):
        ids = b["suffix_ids"][r][b["suffix_mask"][r].bool()].tolist()[:-2]
        full = torch.tensor([prefix + ids])
        ref = model(
            input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=(full == stream.video_id) * 2,
            pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
        ).logits[0, -1]  # fmt: skip
        worst = max(worst, (ref - out.logits[r, b["qpos"][r]]).abs().max().item())
    stream.rng.setstate(rng_state)
    model.train(was)
    return worst


def make_event_head(hidden: int) -> torch.nn.Linear:
    return torch.nn.Linear(hidden, len(EVENTS))


def step_losses(model, stream: Stream, heads, caught: dict, b: dict, running: dict) -> tuple[torch.Tensor, dict]:
    out1, out2 = shared_prefix_forward(model, stream, b)
    hidden = model.config.text_config.hidden_size
    B, T, S = b["labels_fg"].shape
    vp = stream.visual_pos
    # dense vision loss on the merger output, per (clip, step)
    feats = caught["feats"].view(B, T, S, hidden).float()
    fg = b["labels_fg"]
    cell = stream.token_cell
    pool = (cell.view(1, 1, 1, S) == torch.arange(4).view(1, 1, 4, 1)) & fg.unsqueeze(2)  # (B, T, 4, S)
    pool = pool.float() / pool.float().sum(-1, keepdim=True).clamp(min=1)
    l_shape = F.cross_entropy(heads["shape"](torch.einsum("btcs,btsh->btch", pool, feats)).flatten(0, 2),
                              b["labels_shape"].flatten(), ignore_index=-100)  # fmt: skip
    color_tok = torch.gather(b["labels_color"], 2, cell.view(1, 1, S).expand(B, T, S))
    l_color = F.cross_entropy(heads["color"](feats[fg]), color_tok[fg])
    l_fg = F.cross_entropy(heads["fg"](feats).flatten(0, 2), fg.long().flatten())
    l_dense = l_shape + l_color + l_fg
    # layer 0 head 1: a visual token of step t >= 1 attends to the same place at step t - 1
    att = out1.attentions[PREV_LAYER][:, 1][:, vp][:, :, vp].float()  # (B, T*S, T*S)
    q_idx = torch.arange(S, T * S)
    l_prev = -torch.log(att[:, q_idx, q_idx - S] + 1e-6).mean()
    # events from the output of layer EVENT_LAYER
    h = out1.hidden_states[EVENT_LAYER + 1][:, vp].float()  # (B, T*S, hidden)
    wts = torch.ones(len(EVENTS))
    wts[0] = TRAIN["event_none_weight"]
    ev_logits = heads["event"](h).flatten(0, 1)
    ev_t = b["labels_event"].flatten()
    l_event = F.cross_entropy(ev_logits, ev_t, weight=wts)
    # answer position: key words (layer 2 head 0) and retrieval (layer 4 head 0)
    rows = torch.arange(b["qpos"].shape[0])
    p = len(stream.prefix)
    att_w = out2.attentions[WORDS_LAYER][rows, 0, b["qpos"], p:].float()
    l_words = -torch.log((att_w * b["key_words"]).sum(-1) + 1e-6).mean()
    att_r = out2.attentions[RETRIEVAL_LAYER][rows, 0, b["qpos"]][:, vp].float()  # (n, T*S)
    l_ret = _masked_nll((att_r * b["targets"]).sum(-1), torch.ones(len(rows), dtype=torch.bool))
    w = TRAIN["loss_weights"]
    loss = (w["answer"] * out2.loss + w["dense"] * l_dense + w["prev"] * l_prev + w["events"] * l_event
            + w["words"] * l_words + w["retrieval"] * l_ret)  # fmt: skip
    pred = out2.logits[rows, b["qpos"]].argmax(-1)
    for q, ok in zip(b["qtypes"], (pred == b["answer_ids"]).tolist(), strict=True):
        running[q] = (running.get(q, []) + [ok])[-200:]
    ev_pred = ev_logits.argmax(-1)
    ev_mask = ev_t > 0
    parts = {
        "loss": loss.item(), "answer": out2.loss.item(), "dense": l_dense.item(), "prev": l_prev.item(),
        "events": l_event.item(), "event_recall": (ev_pred[ev_mask] == ev_t[ev_mask]).float().mean().item(),
        "words": l_words.item(), "retrieval": l_ret.item(),
        **{f"acc_{q}": sum(v) / len(v) for q, v in running.items()},
    }  # fmt: skip
    return loss, parts


# --------------------------------------------------------------------------------------------- training
_STOP = {"flag": False}


def _on_signal(signum, frame):
    _STOP["flag"] = True


def train(args) -> dict:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    log = lambda msg: print(f"[video] {time.strftime('%H:%M:%S')} {msg}", flush=True)  # noqa: E731
    image_dir = Path(args.init_dir)
    tokenizer, new_words = build_tokenizer(image_dir)
    processor = build_processor(tokenizer, 2 * TRAIN["cell_px"], image_dir)
    model = build_model(tokenizer, new_words, image_dir, log)
    init_sha = hashlib.sha256((image_dir / "model.safetensors").read_bytes()).hexdigest()
    model.set_attn_implementation({"text_config": "eager"})  # the attention losses read attention weights
    n_params = sum(p.numel() for p in model.parameters())
    streams = [Stream(processor, args.seed, TRAIN["cell_px"], f, args.repeat_recolored) for f in args.frames_per_step]
    stream = streams[0]
    hidden = model.config.text_config.hidden_size
    heads = make_heads(hidden, "qwen2_vl", "cpu")
    heads["event"] = make_event_head(hidden)
    caught: dict = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: caught.__setitem__("feats", o))
    params = list(model.parameters()) + list(heads.parameters())
    lr_base = args.lr if args.lr is not None else TRAIN["lr"]
    opt = torch.optim.AdamW(params, lr=lr_base, betas=TRAIN["betas"], weight_decay=TRAIN["weight_decay"])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "video_train.pt"
    history: list[dict] = []
    step, elapsed = 0, 0.0
    checks = {"n_visual_tokens": len(stream.visual_pos), "prefix_tokens": len(stream.prefix), "init_sha256": init_sha}
    if ckpt.is_file() and not args.fresh:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        rngs = state["stream_rng"] if isinstance(state["stream_rng"], list) else [state["stream_rng"]]
        for st, r in zip(streams, rngs, strict=True):
            st.rng.setstate(r)
        torch.set_rng_state(state["torch_rng"])
        history, step, elapsed, checks = state["history"], state["step"], state["elapsed"], state["checks"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
        if checks.setdefault("init_sha256", init_sha) != init_sha:
            raise RuntimeError(f"{image_dir} is not the image model this run started from: {checks}")
    elif args.init_from:  # a new phase: weights, heads and records of an earlier run; new optimiser and schedule
        state = torch.load(args.init_from, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        history, elapsed, checks = state["history"], state["elapsed"], state["checks"]
        if checks.setdefault("init_sha256", init_sha) != init_sha:
            raise RuntimeError(f"{image_dir} is not the image model {args.init_from} started from: {checks}")
        phases = checks.setdefault("phases", [{"steps": state["step"], "lr": TRAIN["lr"]}])
        phases.append({"steps": None, "lr": lr_base, "init_from": str(args.init_from)})
        checks.pop("total_steps", None)
        for st in streams:
            st.rng = random.Random(f"video-train-stream/{args.seed}/phase{len(phases)}/fps{st.fps}")
        phases[-1].update(frames_per_step=list(args.frames_per_step), repeat_recolored=args.repeat_recolored)
        log(f"phase {len(phases)} from {args.init_from} ({elapsed / 60:.1f} min trained before)")
    else:
        checks["shared_prefix_max_logit_diff"] = check_shared_prefix(model, stream)
        if checks["shared_prefix_max_logit_diff"] > 1e-3:
            raise RuntimeError(f"shared-prefix training path differs from the plain forward: {checks}")
    log(f"{n_params / 1e6:.3f}M parameters, vocab {len(tokenizer)}, checks {checks}")

    def save_checkpoint() -> None:
        state = {"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                 "stream_rng": [st.rng.getstate() for st in streams], "torch_rng": torch.get_rng_state(),
                 "history": history, "step": step, "elapsed": elapsed, "checks": checks}  # fmt: skip
        torch.save(state, work / "video_train.tmp")
        (work / "video_train.tmp").replace(ckpt)

    total = args.steps if args.steps is not None else checks.get("total_steps")
    calibrate = total is None
    running: dict = {f: {} for f in args.frames_per_step}
    model.train()
    t_last = time.time()
    calib_from = (step, time.time())
    while (calibrate or step < total) and not _STOP["flag"]:
        if calibrate and step == calib_from[0] + 20:  # --minutes: the step count from the measured speed
            per = (time.time() - calib_from[1]) / 20
            total = max(step + 1, int(args.minutes * 60 / per))
            calibrate = False
            log(f"{per:.2f} s/step -> {total} steps in {args.minutes} min")
        checks["total_steps"] = total
        lr = lr_at(step, total or 10**6, lr_base, TRAIN["warmup"])
        for g in opt.param_groups:
            g["lr"] = lr
        st = streams[step % len(streams)]  # several frame counts: they take turns
        b = st.batch(TRAIN["clips"], TRAIN["questions"])
        loss, parts = step_losses(model, st, heads, caught, b, running[st.fps])
        if st.fps != 2:  # running accuracies of 16-frame clips are logged apart
            parts = {(k.replace("acc_", f"acc{st.fps}_") if k.startswith("acc_") else k): v for k, v in parts.items()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TRAIN["grad_clip"])
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if step % TRAIN["log_every"] == 0 or step == 1:
            phase = len(checks.get("phases", [None]))
            offset = sum(ph["steps"] for ph in checks.get("phases", [])[:-1])
            history.append({"stage": f"phase{phase}", "step": offset + step, "t": round(elapsed, 1), "lr": lr, **parts})
        if step % 50 == 0 or step == 1:
            log(f"{step}/{total} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" ({elapsed:.0f}s)")
        if step % 50 == 0:
            save_checkpoint()
    if "phases" in checks:
        checks["phases"][-1]["steps"] = step
    save_checkpoint()
    hook.remove()
    if step < total:
        log(f"stopped at step {step}; rerun the same command to continue")
        return {}
    return finish(model, processor, tokenizer, n_params, step, elapsed, history, checks, args, log)


def finish(model, processor, tokenizer, n_params, step, elapsed, history, checks, args, log) -> dict:
    """Save fp16 + processor, reload the folder as users do, evaluate per question type, write the results."""
    import transformers

    save = Path(args.save_dir)
    save.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.set_attn_implementation("sdpa")
    model.to(torch.float16).save_pretrained(save)
    processor.save_pretrained(save)
    complete_processor_config(save, "qwen2_vl")
    size = sum(f.stat().st_size for f in save.iterdir() if f.is_file())
    del model
    model, proc2 = load_model(save, dtype=torch.float32)
    samples = V.eval_samples(args.eval_n, seed=TRAIN["eval_seed"], cell_px=TRAIN["cell_px"])
    t1 = time.time()
    res = V.evaluate(model, proc2, samples, batch_size=25)
    eval_s = time.time() - t1
    res.pop("predictions")
    extra = {}
    for fps in (f for f in args.frames_per_step if f != 2):  # also trained on longer clips: evaluate those too
        more = V.eval_samples(args.eval_n, seed=TRAIN["eval_seed"], cell_px=TRAIN["cell_px"], frames_per_step=fps)
        key = f"eval_frames_per_step_{fps}"
        extra[key] = {"n": args.eval_n, "frames": fps * V.STEPS, **V.evaluate(model, proc2, more, batch_size=25)}
        extra[key].pop("predictions")
    report = {
        "model": "qwen2_vl_video",
        "class": type(model).__name__,
        "parameters": n_params,
        "decoder_layers": model.config.text_config.num_hidden_layers,
        "vocab_size": len(tokenizer),
        "visual_tokens_per_clip": checks["n_visual_tokens"],
        "checkpoint_bytes": size,
        "steps": sum(ph["steps"] for ph in checks["phases"]) if "phases" in checks else step,
        "phases": checks.get("phases", [{"steps": step, "lr": TRAIN["lr"]}]),
        "clips_per_step": TRAIN["clips"],
        "questions_per_clip": TRAIN["questions"],
        "train_seconds": round(elapsed, 1),
        "eval_seconds": round(eval_s, 1),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "lineage": {
            "init_from": str(args.init_dir),
            "init_sha256": checks["init_sha256"],
            "init_commit": INIT_COMMIT,
            "layer_sources": LAYER_SOURCES,
        },  # fmt: skip
        "checks": checks,
        "train_config": json.loads(json.dumps(TRAIN)),
        "eval": {"split": "test", "n": args.eval_n, "seed": TRAIN["eval_seed"], **res},
        **extra,
        "loss_history": history,
    }
    log(f"{args.eval_n} test clips: " + ", ".join(f"{q} {v['accuracy']:.3f}" for q, v in res["per_qtype"].items())
        + f"; all {res['accuracy']:.3f}")  # fmt: skip
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_video_train.json").write_text(json.dumps(report, indent=1))
    plot_loss(history, out / "demo_video_loss.png")
    (out / "demo_video_model.md").write_text(markdown(report))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: the checkpoint's, or --minutes)")
    ap.add_argument("--minutes", type=float, default=80.0, help="train time when --steps is not given")
    ap.add_argument("--seed", type=int, default=TRAIN["seed"])
    ap.add_argument("--eval-n", type=int, default=TRAIN["eval_n"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-dir", default=str(ROOT / "vlm_prune" / "demo_models" / "qwen2_vl_video"))
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "results" / "tmp_video"))
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --work-dir")
    ap.add_argument("--init-from", default=None, help="start a new phase from another run's video_train.pt")
    ap.add_argument(
        "--frames-per-step",
        type=int,
        nargs="+",
        default=[2],
        help="frames per clip state in training (2: 8-frame clips; '2 4' alternates 8 and 16 frames)",
    )
    ap.add_argument("--repeat-recolored", type=int, default=0, help="extra copies of the recolored question per clip")
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {TRAIN['lr']})")
    ap.add_argument("--init-dir", default=str(demo_model_path("qwen2_vl")),
                    help=f"the image demo model to start from (the shipped run used commit {INIT_COMMIT})")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

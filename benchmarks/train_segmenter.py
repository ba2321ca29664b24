"""Train the embedded demo segmenter: the embedded LLaVA demo model + `[SEG]` + a tiny SAM, on segmentation mosaics.

    nohup nice -n 10 .venv/bin/python benchmarks/train_segmenter.py --out /tmp/seg_train --minutes 40 &

Data: `vlm_prune.tasks.segmentation` train mosaics only (2x2 easy-VQA train images, referring and reasoning
prompts, masks from the shapes' pixels); evaluation on held-out test mosaics. The prompt words the demo tokenizer
lacks are added as tokens, with `[SEG]`. Trained: the LLM (not its vision tower or projector), `text_hidden_fcs`
and the whole tiny SAM (from scratch: no pretrained SAM is available offline). Loss: LISA's mask loss (2.0 x BCE +
0.5 x dice, at the mask decoder's low resolution, targets downsampled) + the LM's cross-entropy on "[SEG].".

Resumable: `--out` holds `state.pt` (model, optimiser, step, log) after every evaluation; `--minutes` bounds this
run's wall time. The best model by held-out gIoU is saved as a `Segmenter` to `--out/best` (with its processor).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SAM_FIELDS = dict(
    vision_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_dim=128, image_size=128,
                       patch_size=8, output_channels=64, global_attn_indexes=[1, 3], window_size=4, num_pos_feats=32),
    prompt_encoder_config=dict(hidden_size=64, image_size=128, image_embedding_size=16),
    mask_decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_dim=128,
                             iou_head_hidden_dim=64),
)  # fmt: skip


def build(seed: int):
    from transformers import SamConfig, SamModel

    from vlm_prune.demo import demo_model
    from vlm_prune.models.segmenter import Segmenter, SegmenterConfig, add_seg_token
    from vlm_prune.tasks.segmentation import task_words

    vlm, processor = demo_model("llava")
    tokenizer = processor.tokenizer
    unknown = {tokenizer.unk_token_id}
    missing = [w for w in task_words() if set(tokenizer(w, add_special_tokens=False).input_ids) & unknown]
    tokenizer.add_tokens(missing)
    seg_id = add_seg_token(vlm, processor)
    torch.manual_seed(seed)
    sam = SamModel(SamConfig(**SAM_FIELDS))
    return Segmenter(vlm, sam, SegmenterConfig(seg_token_id=seg_id, seg_hidden_offset=-1)), processor, missing


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).mean()


def batch_loss(segmenter, processor, samples):
    from vlm_prune.tasks.segmentation import sam_pixel_values, teacher_forced_inputs

    inputs = dict(teacher_forced_inputs(segmenter.vlm, processor, samples))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    size = segmenter.sam.config.vision_config.image_size
    out = segmenter(ids, sam_pixel_values([s.image for s in samples], size), attention_mask=mask,
                    output_size=(64, 64), **inputs)  # fmt: skip
    logits = torch.stack([m[0] for m in out.mask_logits])
    target = F.interpolate(torch.stack([s.mask for s in samples]).float()[:, None], size=(64, 64), mode="area")[:, 0]
    mask_loss = 2.0 * F.binary_cross_entropy_with_logits(logits, target) + 0.5 * dice_loss(logits, target)
    from vlm_prune.tasks.segmentation import ANSWER

    n = len(processor.tokenizer(ANSWER, add_special_tokens=False).input_ids)
    answer = ids[:, -n:]  # the answer "[SEG]." is teacher-forced: train the LM to say it too
    lm_logits = out.logits[:, -n - 1 : -1]
    ce = F.cross_entropy(lm_logits.reshape(-1, lm_logits.shape[-1]), answer.reshape(-1))
    return mask_loss + ce, float(mask_loss.detach()), float(ce.detach())


@torch.no_grad()
def cache_seg_hidden(segmenter, processor, samples, batch: int = 16) -> torch.Tensor:
    """(N, D) the frozen VLM's hidden states at the [SEG] reading position of each teacher-forced sample."""
    from vlm_prune.tasks.segmentation import teacher_forced_inputs

    out = []
    for i in range(0, len(samples), batch):
        inputs = dict(teacher_forced_inputs(segmenter.vlm, processor, samples[i : i + batch]))
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        hidden = segmenter.vlm(input_ids=ids, attention_mask=mask, output_hidden_states=True, **inputs)
        columns = segmenter.seg_positions(ids, mask)
        out += [hidden.hidden_states[-1][row, c[0]] for row, c in enumerate(columns)]
    return torch.stack(out)


def frozen_batch_loss(segmenter, hidden, pixels, targets):
    """LISA's mask loss for cached [SEG] hidden states (the VLM frozen)."""
    prompts = [e[None] for e in segmenter.text_hidden_fcs(hidden)]
    logits = torch.stack([m[0] for m in segmenter.decode_masks(pixels, prompts, output_size=(64, 64))])
    loss = 2.0 * F.binary_cross_entropy_with_logits(logits, targets) + 0.5 * dice_loss(logits, targets)
    return loss, float(loss.detach()), 0.0


@torch.no_grad()
def evaluate(segmenter, processor, samples, batch: int = 16) -> dict:
    from vlm_prune.tasks.segmentation import giou_ciou, sam_pixel_values, teacher_forced_inputs

    segmenter.eval()
    preds, targets = [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = dict(teacher_forced_inputs(segmenter.vlm, processor, chunk))
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        sam = sam_pixel_values([s.image for s in chunk], segmenter.sam.config.vision_config.image_size)
        masks = segmenter.predict_masks(ids, sam, attention_mask=mask, output_size=(128, 128), **inputs)
        preds += [m[0] for m in masks]
        targets += [s.mask for s in chunk]
    segmenter.train()
    return giou_ciou(preds, targets)


def main() -> None:
    from vlm_prune.tasks.segmentation import make_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/seg_train")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lm-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-vlm", action="store_true", help="train SAM + text_hidden_fcs on cached hidden states")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    segmenter, processor, added = build(args.seed)
    for p in segmenter.vlm.model.vision_tower.parameters():
        p.requires_grad_(False)
    for p in segmenter.vlm.model.multi_modal_projector.parameters():
        p.requires_grad_(False)
    lm = [p for p in segmenter.vlm.parameters() if p.requires_grad]
    head = list(segmenter.sam.parameters()) + list(segmenter.text_hidden_fcs.parameters())
    optimiser = torch.optim.AdamW([{"params": lm, "lr": args.lm_lr}, {"params": head, "lr": args.lr}])
    step, log, best = 0, [], -1.0
    if (out / "state.pt").exists():
        state = torch.load(out / "state.pt", weights_only=False)
        segmenter.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, log, best = state["step"], state["log"], state["best"]
    train = make_samples("train", args.train_samples, seed=args.seed)
    held_out = make_samples("test", args.eval_samples, seed=1234)
    if args.freeze_vlm:
        from vlm_prune.tasks.segmentation import sam_pixel_values

        segmenter.vlm.requires_grad_(False)
        segmenter.vlm.eval()
        cached = cache_seg_hidden(segmenter, processor, train)
        pixels = sam_pixel_values([s.image for s in train], SAM_FIELDS["vision_config"]["image_size"])
        masks = torch.stack([s.mask for s in train]).float()[:, None]
        targets = F.interpolate(masks, size=(64, 64), mode="area")[:, 0]
        print(f"cached {len(train)} hidden states in {time.time() - started:.0f}s", flush=True)
    rng = random.Random(f"train_segmenter/{args.seed}/{step}")
    segmenter.train()
    if args.freeze_vlm:
        segmenter.vlm.eval()
    while time.time() - started < args.minutes * 60:
        if args.freeze_vlm:
            index = torch.tensor(rng.sample(range(len(train)), args.batch))
            loss, mask_loss, ce = frozen_batch_loss(segmenter, cached[index], pixels[index], targets[index])
        else:
            loss, mask_loss, ce = batch_loss(segmenter, processor, rng.sample(train, args.batch))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm + head, 1.0)
        optimiser.step()
        step += 1
        if step % 10 == 0 or step < 5:
            print(f"step {step} mask {mask_loss:.3f} ce {ce:.3f} {time.time() - started:.0f}s", flush=True)
        if step % args.eval_every == 0:
            scores = evaluate(segmenter, processor, held_out)
            log.append({"step": step, **scores, "seconds": time.time() - started})
            print(json.dumps(log[-1]), flush=True)
            if scores["giou"] > best:
                best = scores["giou"]
                segmenter.save_pretrained(out / "best", processor=processor)
            state = {"model": segmenter.state_dict(), "optimiser": optimiser.state_dict(), "step": step, "log": log,
                     "best": best}  # fmt: skip
            torch.save(state, out / "state.pt")
    (out / "log.json").write_text(json.dumps({"log": log, "added_words": added, "sam": SAM_FIELDS}, indent=1))


if __name__ == "__main__":
    main()

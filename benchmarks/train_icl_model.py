"""Train the ICL demo model: a small LLaVA (CLIP ViT + projector + 8-layer Llama) on nonce-word episodes.

    python benchmarks/train_icl_model.py --minutes 25            # resumable: run it again to continue
    python benchmarks/train_icl_model.py --evaluate-only

The task is `vlm_prune.tasks.icl` (easy-VQA train images only; words `NONCE_WORDS`, bound at random per episode):
the model must read the binding from the demonstrations, so 0-shot accuracy stays at chance while 4-shot accuracy
measures in-context learning. Images are 64 px (easy-VQA's own size), patch 16: 16 visual tokens per image, so a
4-shot prompt holds 80 visual tokens. The loss covers the answer word and the end token only. Each batch also
holds `--perception` single-image questions "name the color" -> the colour word (auxiliary supervision of
perception; a wording the episodes never use, and colour words are never an episode's answer).

Writes the model and processor to `vlm_prune/demo_models/llava_icl/` (fp16) and the report to
`benchmarks/results/demo_icl_model.json`. Checkpoints (model, optimiser, step, history) go to --work.

Status: BELOW THE BAR, no checkpoint ships. One run on the shared 2-core machine (2026-12-01, 1 thread, load 6-10):
2400 steps of 32 rows (8 of them "name the color"), lr 2e-3, 25 min -> 4-shot 54.7 %, 2-shot 52.3 %, 0-shot 10.5 %
(chance 12.5 %) on 256 test episodes each. The model learnt to answer with one of the two words in its context (2-way
chance is 50 %) but not to match the query's colour to a demonstration's; the bar is >= 90 % at 4 shots. Longer
training, or a curriculum (1-way episodes first), is the next thing to try.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm_prune.data.mosaic import COLORS, SHAPES  # noqa: E402
from vlm_prune.tasks.icl import NONCE_WORDS, QUESTIONS, cell_image, evaluate, make_episodes  # noqa: E402

IMAGE_PX, PATCH = 64, 16
TOKENS_PER_IMAGE = (IMAGE_PX // PATCH) ** 2
LAYERS = 8
#: the auxiliary single-image question (a different wording from the episodes' query, so the two never mix)
PERCEPTION_QUESTION = "name the color"
OUT = ROOT / "vlm_prune" / "demo_models" / "llava_icl"
RESULTS = ROOT / "benchmarks" / "results"
CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    corpus = ["USER: ASSISTANT:", *QUESTIONS.values(), PERCEPTION_QUESTION, " ".join(NONCE_WORDS), *COLORS, *SHAPES]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", bos_token="<s>",
        padding_side="left",
    )  # fmt: skip
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.model_max_length = 1024
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=hf, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT,
    )  # fmt: skip


def build_model(tokenizer):
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_PX,
        patch_size=PATCH,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=TOKENS_PER_IMAGE, vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=2,
    )  # fmt: skip
    return model


@functools.lru_cache(maxsize=2)
def cell_pixels(processor, split: str) -> dict[int, torch.Tensor]:
    """image id -> (3, 64, 64) processed pixels of every cell of `split` (computed once)."""
    from vlm_prune.data.mosaic import load_cells

    cells = load_cells(split)
    pixels = processor.image_processor([cell_image(c) for c in cells], return_tensors="pt")["pixel_values"]
    return {cell.image_id: row for cell, row in zip(cells, pixels)}


def training_batch(processor, rng: random.Random, batch_size: int, step: int, perception: int = 0):
    """A batch of train episodes (1-4 shots) with labels on the answer word and the end token; the first
    `perception` rows are single-image colour questions instead (auxiliary supervision of perception).

    Builds exactly what `episode_inputs` builds (the prompt through the chat template, each <image> expanded to the
    image's tokens, left padding), with the cells' pixels processed once instead of per batch.
    """
    from vlm_prune.engine.segments import interleaved_prompt

    episodes = []
    for index in range(batch_size):
        shots = rng.choice((1, 2, 3, 4, 4, 4))
        episodes += make_episodes("train", 1, seed=step * batch_size + index, shots=shots, words=NONCE_WORDS)
    table = cell_pixels(processor, "train")
    tokenizer = processor.tokenizer
    prompts, pixels = [], []
    for index, episode in enumerate(episodes):
        if index < perception:  # auxiliary: one image, its colour name (teaches perception; no binding)
            prompt, _ = interleaved_prompt(processor, [], (0, PERCEPTION_QUESTION))
            answer = episode.query.color
            pixels.append(table[episode.query.image_id])
        else:
            demos = [(0, word) for _, word in episode.demonstrations]  # placeholders: pixels come from the table
            prompt, _ = interleaved_prompt(processor, demos, (0, episode.question))
            answer = episode.answer
            pixels += [table[cell.image_id] for cell, _ in episode.demonstrations] + [table[episode.query.image_id]]
        prompts.append(prompt.replace("<image>", "<image>" * TOKENS_PER_IMAGE) + f" {answer}</s>")
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    ids = encoded["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "pixel_values": torch.stack(pixels),
            "labels": labels}  # fmt: skip


def lr_at(step: int, total: int, base: float, warm: int = 100) -> float:
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of this run")
    parser.add_argument("--steps", type=int, default=3000, help="schedule length (cosine decay over it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--perception", type=int, default=8, help="rows per batch of single-image colour questions")
    parser.add_argument("--work", default="/tmp/icl_train", help="checkpoint folder (resumable)")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    model = build_model(processor.tokenizer)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    state = {"step": 0, "history": []}
    checkpoint = work / "checkpoint.pt"
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        state = saved["state"]
        print(f"resumed at step {state['step']}", flush=True)
    rng = random.Random(state["step"])
    started = time.time()
    model.train()
    while not args.evaluate_only and state["step"] < args.steps and time.time() - started < args.minutes * 60:
        step = state["step"]
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        batch = training_batch(processor, rng, args.batch_size, step, perception=args.perception)
        loss = model(**batch).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        state["history"].append({"step": step, "loss": float(loss.detach())})
        state["step"] = step + 1
        if step % 25 == 0:
            print(f"step {step} loss {float(loss):.4f} {time.time() - started:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0:
            model.eval()
            accuracy = evaluate(model, processor, make_episodes("test", 64, seed=7, words=NONCE_WORDS))["accuracy"]
            model.train()
            state["history"][-1]["test_4shot"] = accuracy
            print(f"step {step} 4-shot test accuracy {accuracy:.3f}", flush=True)
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "state": state}, checkpoint)
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "state": state}, checkpoint)
    model.eval()
    report = {"steps": state["step"], "layers": LAYERS, "tokens_per_image": TOKENS_PER_IMAGE, "words": NONCE_WORDS}
    for shots in (4, 2, 0):
        episodes = make_episodes("test", 256, seed=11, shots=shots, words=NONCE_WORDS)
        report[f"test_{shots}shot"] = evaluate(model, processor, episodes, batch_size=32)["accuracy"]
    report["chance_0shot"] = 1 / len(NONCE_WORDS)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps(report), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(OUT)
    processor.save_pretrained(OUT)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo_icl_model.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_model", "build_processor", "cell_image", "main", "training_batch"]

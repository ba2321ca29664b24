"""Does an in-LLM attention signal find the asked cell? A probe of AdaptInfer's score on the embedded models.

    python benchmarks/adaptinfer_signal_probe.py --model llava --n 30

For held-out cell questions (colour, shape, yes/no) it runs the UNPRUNED model once with eager attention and,
for every decoder layer l, ranks the visual tokens by
  * `adaptinfer`: AdaptInfer's score from layer l's attention (`methods.adaptinfer.adaptinfer_scores`: every text
    query after the image, weighted by its text prior, heads summed), the signal a stage on the input of layer
    l + 1 uses;
  * `last`: the attention of the last prompt token alone, heads summed (FastV's signal, arXiv 2403.06764).
It reports the recall of the asked cell's shape tokens (the 8x8 blocks of that cell where the shape is drawn,
the tokens the answer needs) among the top-k, for k = 64 / 128 / 192 / 288 (random keeps k / 576 of them).

On the unpruned model the later layers see every token, so for a stage after the first the numbers are an upper
bound of what the pruned run sees. Writes nothing; print the table into the results by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm_prune.data import mosaic as M  # noqa: E402
from vlm_prune.demo import build_prompt, load_model  # noqa: E402
from vlm_prune.methods.adaptinfer import adaptinfer_scores  # noqa: E402

SIDE, PER, BLOCK = 24, 8, 8  # 24 x 24 visual tokens, 8 x 8 tokens per cell, 8 x 8 pixels per token
KS = (64, 128, 192, 288)


def shape_tokens(image, cell: int, grid: int = 3, threshold: int = 40, min_fraction: float = 0.1) -> torch.Tensor:
    """(576,) bool: the visual tokens of `cell` whose 8x8 pixel block shows its shape (>= 10 % of the pixels
    differ from the cell's background, the median corner colour, by more than `threshold`); the training
    script's `foreground_blocks` rule."""
    px = torch.from_numpy(np.array(image.convert("RGB"))).int()
    r0, c0 = (cell // grid) * M.CELL_PX, (cell % grid) * M.CELL_PX
    cp = px[r0 : r0 + M.CELL_PX, c0 : c0 + M.CELL_PX]
    bg = torch.stack([cp[0, 0], cp[0, -1], cp[-1, 0], cp[-1, -1]]).median(0).values
    blocks = ((cp - bg).abs().amax(-1) > threshold).float().view(PER, BLOCK, PER, BLOCK).mean((1, 3)) >= min_fraction
    out = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    out[(cell // grid) * PER : (cell // grid + 1) * PER, (cell % grid) * PER : (cell % grid + 1) * PER] = blocks
    return out.flatten()


def probe(model_name: str, n: int) -> dict[str, list[list[float]]]:
    """{"adaptinfer" | "last": [layer][k index] mean recall} over `n` held-out cell questions."""
    from tqdm.auto import tqdm

    model, proc = load_model(ROOT / "vlm_prune" / "demo_models" / model_name)
    model.set_attn_implementation("eager")
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    layers = model.config.text_config.num_hidden_layers
    sums = {s: torch.zeros(layers, len(KS)) for s in ("adaptinfer", "last")}
    samples = M.make_mosaics("test", n, seed=0, qtypes=M.CELL_QTYPES)
    with torch.no_grad():
        for s in tqdm(samples, desc=f"probe {model_name}"):
            enc = proc(text=[build_prompt(proc, s.question)], images=[s.image], return_tensors="pt")
            ids = enc["input_ids"][0]
            vis = (ids == image_id).nonzero().flatten()
            text = torch.arange(int(vis[-1]) + 1, len(ids))
            target = shape_tokens(s.image, s.spec.cell)
            out = model(**enc, output_attentions=True)
            for layer in range(layers):
                rows = out.attentions[layer][0][:, text, :]  # (H, T, L)
                scores = {"adaptinfer": adaptinfer_scores(rows, text, vis), "last": rows[:, -1, vis].sum(0)}
                for name, sc in scores.items():
                    for j, k in enumerate(KS):
                        sums[name][layer, j] += target[sc.topk(k).indices].float().sum() / target.sum()
    return {name: (v / n).tolist() for name, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["llava", "qwen2_vl"], default="llava")
    ap.add_argument("--n", type=int, default=30, help="held-out cell questions")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = probe(args.model, args.n)
    print(f"{args.model}, {args.n} cell questions: recall of the asked cell's shape tokens in the top-k")
    print("| layer | " + " | ".join(f"AdaptInfer k={k}" for k in KS) + " | " + " | ".join(f"last k={k}" for k in KS)
          + " |")  # fmt: skip
    print("|---:|" + "---:|" * (2 * len(KS)))
    for layer, (a, b) in enumerate(zip(res["adaptinfer"], res["last"], strict=True)):
        print(f"| {layer} | " + " | ".join(f"{x:.2f}" for x in a + b) + " |")
    print("| random | " + " | ".join(f"{k / 576:.2f}" for k in KS * 2) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

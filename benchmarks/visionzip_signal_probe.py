"""Does a model's vision-attention signal point at informative tokens? A probe for VisionZip.

VisionZip keeps the tokens its vision signal ranks highest (CLS attention, or for towers without a CLS
token the mean attention each token receives). That assumes attention concentrates on informative
tokens. This script checks the assumption on an embedded demo model. It answers held-out cell questions
keeping the same number of tokens chosen five ways:

* VisionZip as shipped (dominant + contextual);
* the most-attended tokens only;
* the least-attended tokens only;
* contextual merging only;
* random.

    python benchmarks/visionzip_signal_probe.py --model qwen2_vl --keep 192 --n 60

Result on the embedded Qwen2-VL (keep 192, 60 cell questions, seed 0; written in
benchmarks/results/methods_comparison.md): 62 / 38 / 98 / 87 / 88 %. Its ViT's attention sinks are
background patches.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import vlm_prune
from vlm_prune.data import CELL_QTYPES, make_mosaics
from vlm_prune.demo import demo_model, evaluate
from vlm_prune.methods.visionzip import VisionZip


@dataclass
class LeastAttended(VisionZip):
    """VisionZip's dominant-token rule with the vision signal negated (the least-attended tokens win)."""

    def select(self, ctx):
        ctx.vision_attention = -ctx.vision_attention
        return super().select(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_vl", help="embedded demo model (llava or qwen2_vl)")
    parser.add_argument("--keep", type=int, default=192, help="visual tokens kept per image")
    parser.add_argument("--n", type=int, default=60, help="held-out cell questions")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = demo_model(args.model)
    samples = make_mosaics("test", args.n, seed=0, qtypes=CELL_QTYPES)
    k = args.keep
    variants = {
        "visionzip (dominant + contextual)": VisionZip(keep=k),
        "most-attended only": VisionZip(keep=k, dominant=k, contextual=0),
        "least-attended only": LeastAttended(keep=k, dominant=k, contextual=0),
        "contextual merging only": VisionZip(keep=k, dominant=0, contextual=k),
        "random": "random",
    }
    print(f"{args.model}, keep {k} visual tokens, {args.n} held-out cell questions")
    for label, method in variants.items():
        with vlm_prune.pruned(model, method, keep=k if isinstance(method, str) else None):
            result = evaluate(model, processor, samples, batch_size=8, progress=False)
        print(f"  {label:36s} {100 * result['accuracy']:5.1f} %")


if __name__ == "__main__":
    main()

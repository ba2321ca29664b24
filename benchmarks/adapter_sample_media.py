"""Replay micro-benchmark of `Adapter.sample_media`: host CPU time per prefill call, every toy family at batch 1, 8.

The call's arguments are recorded inside a real generate() (tiny random models, `random` method, keep 0.25), then
the call alone is replayed (1 torch thread, `time.thread_time`). Run it once per code version and merge the JSONs:

    OMP_NUM_THREADS=1 python benchmarks/adapter_sample_media.py --tag after --json /tmp/after.json
    PYTHONPATH=/tmp/old OMP_NUM_THREADS=1 python benchmarks/adapter_sample_media.py --tag before --json /tmp/before.json
    python benchmarks/adapter_sample_media.py --table /tmp/before.json /tmp/after.json --out x.md
"""

from __future__ import annotations

import argparse
import json
import time

FAMILIES = ("llava", "llava_next", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def measure(family: str, batch: int, calls: int) -> float:
    """Median over 5 rounds of the ms per replayed call."""
    import torch

    import vlm_prune
    from vlm_prune.toy_models import build_tiny, make_inputs

    model = build_tiny(family)
    inputs = make_inputs(model, batch=batch)
    recorded = {}
    with vlm_prune.pruned(model, "random", keep=0.25) as handle, torch.no_grad():
        fast = handle.adapter.sample_media

        def record(*args):
            recorded["args"] = args
            return fast(*args)

        handle.adapter.sample_media = record
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        args = recorded["args"]
        for _ in range(50):
            fast(*args)
        rounds = []
        for _ in range(5):
            start = time.thread_time()
            for _ in range(calls):
                fast(*args)
            rounds.append((time.thread_time() - start) / calls * 1e3)
    return sorted(rounds)[2]


def table(paths: list[str]) -> str:
    runs = [json.load(open(path)) for path in paths]
    tags = [run["tag"] for run in runs]
    lines = ["| family | batch | " + " | ".join(f"{tag} ms" for tag in tags) + " |", "|---|---|" + "---|" * len(tags)]
    for key in runs[0]["rows"]:
        family, batch = key.split("|")
        lines.append(
            f"| {family} | {batch} | " + " | ".join(f"{run['rows'].get(key, float('nan')):.3f}" for run in runs) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="now")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", help="write this run's numbers here")
    parser.add_argument("--table", nargs="+", help="JSONs of earlier runs: print them as one markdown table")
    parser.add_argument("--out", help="write the table here too")
    args = parser.parse_args()
    if args.table:
        text = table(args.table)
    else:
        import torch

        torch.set_num_threads(1)
        rows = {}
        for family in args.families.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows[f"{family}|{batch}"] = measure(family, batch, args.calls)
                print(family, batch, f"{rows[f'{family}|{batch}']:.3f} ms", flush=True)
        if args.json:
            json.dump({"tag": args.tag, "rows": rows}, open(args.json, "w"), indent=1)
        text = table([args.json]) if args.json else ""
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()

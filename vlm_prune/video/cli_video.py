"""`vlm-prune video`: answer a question about a video file with fewer visual tokens (the VideoQA front end).

    vlm-prune video                                   # demo.mp4 (iscc-samples) on the embedded video model
    vlm-prune video clip.mp4 --question "what happens at the end?" --method evs --keep 0.25 --sampler bolt

Prints the answer, the frames chosen (original indices and seconds), the visual tokens requested and kept, and
the time of each step. Relevance samplers (clip_topk, bolt, aks) score frames with `--clip DIR` (a local
CLIP / SigLIP folder saved by transformers) or, without it, with `FrameChangeScorer` (how much each frame
differs from the one before; no weights, so it runs offline).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEFAULT_QUESTION = "what is in the top left at the start?"
DEFAULT_MODEL = "qwen2_vl_video"

DESCRIPTION = """
Decodes the video (decord, PyAV as fallback; fps and frame count from the container), picks --num-frames frames
with --sampler, and answers --question with the model pruned by --method at --keep, through
vlm_prune.pipelines.VideoQA. With no PATH it answers about demo.mp4 of the iscc-samples package (h264,
176x144, 24 fps, 1441 frames) on the embedded video model, offline.

Samplers: uniform (bin centres, the last frame can be picked), clip_topk (the most relevant frames), bolt
(BOLT, inverse-transform sampling of relevance^alpha), aks (AKS, relevance vs coverage by recursive splits).
Relevance comes from --clip DIR (a transformers CLIPModel / SiglipModel folder) or, without it, from frame
change (no weights: it ignores the question).
"""

EPILOG = """
examples:
  vlm-prune video
  vlm-prune video --sampler bolt --method evs --keep 0.25
  vlm-prune video clip.mp4 --question "which shape moved?" --num-frames 8 --sampler aks --clip ./clip-vit-b32
  vlm-prune video clip.mp4 --model ./my_qwen2_5_vl --method none --json
"""


def add_parser(sub: Any, formatter: type) -> argparse.ArgumentParser:
    """Register the `video` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "video",
        help="answer a question about a video file with fewer visual tokens (VideoQA)",
        description=DESCRIPTION.strip("\n"),
        epilog=EPILOG.strip("\n"),
        formatter_class=formatter,
    )
    p.add_argument("path", nargs="?", default=None, help="video file (default: iscc-samples' demo.mp4)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="the question asked about the video")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local folder or hub id of a video model "
                   "(Qwen2/2.5/3-VL, LLaVA-OneVision, LLaVA-NeXT-Video)")
    p.add_argument("--method", default="evs", help="pruning method (see `vlm-prune methods`), or none")
    p.add_argument("--keep", default="0.25", help="budget: a float = fraction of video tokens, an int = tokens")
    p.add_argument("--num-frames", type=int, default=16, help="frames given to the model")
    p.add_argument("--sampler", default="uniform", choices=["uniform", "clip_topk", "bolt", "aks"],
                   help="how the frames the model sees are chosen")
    p.add_argument("--clip", default=None, metavar="DIR", help="CLIP / SigLIP folder scoring frame relevance")
    p.add_argument("--score-fps", type=float, default=1.0, help="frames per second scored for relevance")
    p.add_argument("--max-pixels", type=int, default=None, help="frame area cap (Qwen; default: the processor's)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length in tokens")
    p.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"], help="video decoder")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _keep(text: str) -> float | int | None:
    if text.lower() == "none":
        return None
    return float(text) if any(c in text for c in ".e") else int(text)


def _default_video() -> str:
    from ..errors import InputError

    try:
        import iscc_samples
    except ImportError as e:
        raise InputError("no PATH given and iscc-samples is not installed: pip install iscc-samples, or pass a "
                         "video file") from e  # fmt: skip
    return str(next(p for p in iscc_samples.videos() if p.name == "demo.mp4"))


def _scorer(clip: str | None, device: str):
    from .scorers import FrameChangeScorer, TransformersClipScorer

    if clip is None:
        return FrameChangeScorer()
    from transformers import AutoModel, AutoProcessor

    return TransformersClipScorer(AutoModel.from_pretrained(clip).to(device), AutoProcessor.from_pretrained(clip))


def run(args: argparse.Namespace) -> int:
    """Answer once and print; returns the exit status."""
    import torch

    from ..bench_models import load_bench_model
    from ..pipelines import VideoQA
    from .decode import probe

    if args.threads:
        torch.set_num_threads(int(args.threads))
    path = args.path or _default_video()
    model, processor, _ = load_bench_model(args.model, device=args.device)
    relevance = args.sampler != "uniform"
    qa = VideoQA(
        model, processor, method=args.method, keep=_keep(args.keep), num_frames=args.num_frames,
        sampler=args.sampler, scorer=_scorer(args.clip, args.device) if relevance else None,
        score_fps=args.score_fps, max_pixels=args.max_pixels, backend=args.backend,
        max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    result = qa.answer(path, args.question)
    fps = probe(path, backend=args.backend).fps if result.stats.video_fps is None else result.stats.video_fps
    s = result.stats
    if args.json:
        print(json.dumps({"video": path, "question": args.question, "answer": result.text, "frames": result.frames,
                          "scorer": None if not relevance else (args.clip or "frame_change"),
                          "stats": s.as_dict()}, indent=2, default=str))  # fmt: skip
        return 0
    scorer = "" if not relevance else f", relevance from {args.clip or 'frame change (no CLIP given)'}"
    print(f"video:    {path} ({s.video_frames} frames at {fps:g} fps)")
    print(f"question: {args.question}")
    print(f"answer:   {result.text}")
    print(f"frames:   {len(result.frames)} by {s.sampler}{scorer}: {result.frames}")
    print(f"          at seconds {[round(i / fps, 2) for i in result.frames]}")
    print(f"tokens:   {s.tokens_kept} kept of {s.video_tokens} video tokens ({s.tokens_requested} requested; "
          f"method {s.method or 'none'}, keep {s.keep})")  # fmt: skip
    print("time:     " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in s.seconds.items()))
    return 0

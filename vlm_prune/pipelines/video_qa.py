"""VideoQA: a video file (or frames) and a question in, an answer with fewer visual tokens out.

    qa = VideoQA(model, processor, method="evs", keep=0.25, num_frames=16, sampler="uniform")
    result = qa.answer("clip.mp4", "what happens at the end?")
    result.text, result.frames, result.stats     # answer, ORIGINAL frame indices, tokens + timings

Steps of `answer` (each timed in `stats.seconds`):
1. decode: `vlm_prune.video.decode` (decord, PyAV fallback); fps and frame count from the container. Before any
   frame is decoded the vision input size is checked against `max_vision_patches` (a `VideoMemoryError` says
   what to lower).
2. frame_selection: `uniform` picks bin centres; `clip_topk` / `bolt` / `aks` score `score_fps` frames per
   second (decoded and scored in batches at the scorer's resolution) with `scorer` (a `FrameScorer`, e.g.
   `TransformersClipScorer`) against the question, then pick `num_frames` of them.
3. vision, prefill, generation: one `model.generate` under `vlm_prune.pruned(model, method, keep)` (nothing is
   left on the model afterwards). The vision tower's forward is timed by a hook on it; prefill is the first
   forward of generate minus the vision time, generation the rest of generate.

LLaVA-OneVision / LLaVA-NeXT-Video inputs follow `vlm_prune.video.llava_inputs` (frames at the vision tower's
size, one pooled grid per frame, no timestamps in either family). Qwen inputs follow
`vlm_prune.video.qwen_inputs`: Qwen3-VL gets `<t seconds>` stamps from the original frame indices
and fps; Qwen2.5-VL's evenly spaced times raise a `NonUniformFramesWarning` for non-uniform choices. The stats
report the video tokens before pruning, the count the budget asks for (EVS: `retained_count`, the same number
vLLM sizes) and the count the engine actually kept.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, PruneError
from ..video import decode as D
from ..video import llava_inputs as L
from ..video import qwen_inputs as Q
from ..video import samplers as S
from ..video.scorers import FrameScorer

#: default cap on vision-tower input patches per video (frames x patches per frame); ~16 frames at 896 x 896
DEFAULT_MAX_VISION_PATCHES = 65536
NO_PRUNING = (None, "none")
SCORE_SIDE = 224  # short side of the frames given to the relevance scorer
PROGRESS_AFTER = 256  # candidates above which scoring shows a progress bar
STEPS = ("decode", "frame_selection", "vision", "prefill", "generation")


class VideoMemoryError(PruneError, ValueError):
    """frames x resolution above the cap set for the vision tower's input."""


@dataclass(frozen=True)
class Frames:
    """Frames already decoded: (F, H, W, 3) uint8, their ORIGINAL indices (F,), the video's fps and length."""

    frames: np.ndarray
    indices: Sequence[int]
    fps: float | None = None
    total_frames: int | None = None


@dataclass
class VideoQAStats:
    """What one `answer` cost: tokens (per video) and seconds per step."""

    video_tokens: int  # video tokens of the chosen frames before pruning
    tokens_requested: int  # what the budget asks for (EVS: retained_count)
    tokens_kept: int  # what the engine kept
    keep: float | int | None
    method: str | None
    sampler: str
    num_frames: int
    video_fps: float | None
    video_frames: int | None
    grid_thw: tuple[int, int, int]
    seconds: dict[str, float] = field(default_factory=dict)
    prune: dict | None = None  # handle.stats.as_dict() when pruning

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.seconds.items())
        return (
            f"video tokens {self.video_tokens} -> {self.tokens_kept} kept ({self.tokens_requested} requested, "
            f"method {self.method}, keep {self.keep}); {self.num_frames} frames by {self.sampler}; {times}"
        )


@dataclass
class VideoAnswer:
    text: str
    frames: list[int]  # ORIGINAL frame indices, in time order
    stats: VideoQAStats


class _Timer:
    """Instance-level hooks timing the vision tower and the forwards of one generate() call.

    `forwards` and `visions` hold (start, end) perf_counter intervals; generate() may run the vision tower
    before its first forward (Qwen in transformers 5) or inside it, so the prefill is the first forward minus
    the vision time that falls inside it."""

    def __init__(self, model: Any, vision: torch.nn.Module | None) -> None:
        self.model, self.vision = model, vision
        self.forwards: list[tuple[float, float]] = []
        self.visions: list[tuple[float, float]] = []
        self._handles: list = []
        self._t0: dict[str, float] = {}

    def __enter__(self) -> _Timer:
        def pre(key: str):
            def hook(*_args, **_kwargs):
                self._t0[key] = time.perf_counter()

            return hook

        def post(key: str, into: list):
            def hook(*_args, **_kwargs):
                into.append((self._t0[key], time.perf_counter()))

            return hook

        self._handles.append(self.model.register_forward_pre_hook(pre("forward")))
        self._handles.append(self.model.register_forward_hook(post("forward", self.forwards)))
        if self.vision is not None:
            self._handles.append(self.vision.register_forward_pre_hook(pre("vision")))
            self._handles.append(self.vision.register_forward_hook(post("vision", self.visions)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    @property
    def vision_seconds(self) -> float:
        return sum(b - a for a, b in self.visions)

    @property
    def first_forward_seconds(self) -> float:
        return self.forwards[0][1] - self.forwards[0][0] if self.forwards else 0.0

    @property
    def prefill_seconds(self) -> float:
        """The first forward without the vision time inside it."""
        if not self.forwards:
            return 0.0
        a, b = self.forwards[0]
        inside = sum(max(0.0, min(b, v1) - max(a, v0)) for v0, v1 in self.visions)
        return (b - a) - inside


def _vision_module(model: Any) -> torch.nn.Module | None:
    for path in ("model.visual", "visual", "model.vision_tower", "vision_tower"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    return None


def _resize_short(frames: np.ndarray, side: int) -> np.ndarray:
    """Frames scaled so that the short side is `side` (no upscaling), for scoring."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = side / min(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


class VideoQA:
    """Answer questions about videos with a (pruned) video VLM.

    model / processor: a Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision or LLaVA-NeXT-Video model and its
        processor (with torchvision installed the processor's own video processor builds the inputs; without it,
        `qwen_inputs.numpy_inputs` / `llava_inputs.numpy_inputs`).
    method / keep / method_options: passed to `vlm_prune.pruned`; method "none" (or None) answers unpruned.
    num_frames: frames given to the model. sampler: "uniform", "clip_topk", "bolt" or "aks" (the last three need
        `scorer`). score_fps: frames per second scored for relevance. sampler_options: e.g. {"alpha": 3.0}.
    min_pixels / max_pixels: frame area bounds (default: the processor's; Qwen only: the LLaVA families resize
        every frame to the vision tower's square size). max_vision_patches: cap on
        frames x patches per frame, checked before decoding.
    backend: "auto" (decord, then PyAV), "decord" or "pyav". max_new_tokens: answer length.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        method: str | None = "evs",
        keep: float | int | None = 0.25,
        num_frames: int = 16,
        sampler: str = "uniform",
        *,
        scorer: FrameScorer | None = None,
        score_fps: float = 1.0,
        sampler_options: dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_vision_patches: int = DEFAULT_MAX_VISION_PATCHES,
        backend: str = "auto",
        max_new_tokens: int = 32,
        **method_options: Any,
    ) -> None:
        if sampler not in S.SAMPLERS:
            raise S.SamplerError(f"unknown sampler {sampler!r}; choose one of {S.SAMPLERS}")
        if sampler in S.RELEVANCE_SAMPLERS and scorer is None:
            raise S.SamplerError(f"sampler {sampler!r} needs scorer= (e.g. vlm_prune.video.TransformersClipScorer)")
        S.uniform_indices(max(1, int(num_frames)), num_frames)  # validates num_frames
        self.model, self.processor = model, processor
        self.method = None if method in NO_PRUNING else method
        self.keep, self.method_options = keep, method_options
        self.num_frames, self.sampler, self.scorer = int(num_frames), sampler, scorer
        self.score_fps, self.sampler_options = float(score_fps), dict(sampler_options or {})
        self.max_vision_patches, self.backend, self.max_new_tokens = int(max_vision_patches), backend, max_new_tokens
        self.family = Q.family_of(model)
        self.llava = self.family in L.LLAVA_VIDEO_FAMILIES
        if self.llava:
            if min_pixels is not None or max_pixels is not None:
                raise InputError(f"{self.family} resizes every frame to its vision tower's square size: min_pixels / "
                                 "max_pixels do not apply (lower num_frames to spend less)")  # fmt: skip
            self.settings: Any = L.settings_for(model, processor)
        elif self.family in Q.QWEN_VIDEO_FAMILIES:
            self.settings = Q.settings_for(processor, model, min_pixels, max_pixels)
        else:
            raise InputError(
                f"VideoQA builds video inputs for {Q.QWEN_VIDEO_FAMILIES + L.LLAVA_VIDEO_FAMILIES}; {self.family} is "
                "not one of them (prune its video with vlm_prune.apply on inputs from its own processor instead)"
            )

    # ------------------------------------------------------------------ sizes and budgets

    def check_memory(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """The (t, h, w) grid of num_frames frames of height x width, or VideoMemoryError above the cap."""
        if self.llava:
            per_frame = self.settings.patches_per_frame
            if num_frames * per_frame > self.max_vision_patches:
                raise VideoMemoryError(
                    f"{num_frames} frames of {per_frame} vision patches each ({self.family} resizes frames to "
                    f"{self.settings.size}x{self.settings.size}) are {num_frames * per_frame} patches, above "
                    f"max_vision_patches={self.max_vision_patches}: lower num_frames (to <= "
                    f"{self.max_vision_patches // per_frame}), or raise max_vision_patches if the accelerator has "
                    "the memory"
                )
            return (num_frames, *self.settings.frame_grid)
        grid = Q.grid_for(height, width, num_frames, self.settings)
        patches = grid[0] * grid[1] * grid[2]
        if patches > self.max_vision_patches:
            per_frame = grid[1] * grid[2]
            tps = self.settings.temporal_patch_size
            frames_fit = max(0, (self.max_vision_patches // per_frame) // tps * tps)
            px_fit = self.max_vision_patches // max(1, grid[0]) * self.settings.patch_size**2
            raise VideoMemoryError(
                f"{num_frames} frames of {height}x{width} give {grid[0]}x{grid[1]}x{grid[2]} = {patches} vision "
                f"patches, above max_vision_patches={self.max_vision_patches}: lower num_frames (to <= {frames_fit} "
                f"at this size) or max_pixels (to <= {px_fit} per frame at this frame count), or raise "
                "max_vision_patches if the accelerator has the memory"
            )
        return grid

    def requested_tokens(self, grid: tuple[int, int, int]) -> tuple[int, int]:
        """(video tokens before pruning, tokens the budget asks for) for one video grid."""
        from ..engine.budget import tokens_to_keep
        from ..methods.evs import retained_count

        merge = 1 if self.llava else self.settings.merge_size
        total = grid[0] * grid[1] * grid[2] // merge**2
        if self.method is None or self.keep is None:
            return total, total
        if self.method == "evs" and not isinstance(self.keep, int):
            return total, retained_count(grid, 1.0 - float(self.keep), spatial_merge_size=merge)
        return total, tokens_to_keep(self.keep, total, total)

    # ------------------------------------------------------------------ frames

    def _score_candidates(self, source: str | Frames, candidates: list[int], question: str) -> np.ndarray:
        """(C,) similarity of each candidate frame: decoded, shrunk to a short side of `score_side` and scored
        chunk by chunk (the scorer's batch size), with a progress bar past `progress_after` candidates."""
        batch = int(getattr(self.scorer, "batch_size", 32))
        starts = range(0, len(candidates), batch)
        if len(candidates) > PROGRESS_AFTER:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="scoring frames", unit="batch")
        scores = []
        for i in starts:
            chunk = candidates[i : i + batch]
            if isinstance(source, Frames):
                frames = source.frames[chunk]
            else:
                frames, _ = D.read_frames(source, chunk, backend=self.backend)
            scores.append(np.asarray(self.scorer.score(_resize_short(frames, SCORE_SIDE), question), np.float64))
        return np.concatenate(scores)

    def choose_frames(self, source: str | Frames, total: int, fps: float, question: str) -> list[int]:
        """Positions (into the video, or into `Frames.frames`) of the frames the model sees, in time order."""
        if self.sampler == "uniform":
            return S.uniform_indices(total, self.num_frames)
        candidates = S.candidate_indices(total, fps, self.num_frames, self.score_fps)
        similarity = self._score_candidates(source, candidates, question)
        picked = S.select(self.sampler, similarity, self.num_frames, **self.sampler_options)
        return [candidates[p] for p in picked]

    # ------------------------------------------------------------------ answer

    def answer(self, video: str | Path | Frames | tuple, question: str) -> VideoAnswer:
        """Answer `question` about `video`: a path, a `Frames`, or (frames, indices[, fps[, total_frames]])."""
        seconds = dict.fromkeys(STEPS, 0.0)
        t0 = time.perf_counter()
        if isinstance(video, (str, Path)):
            info = D.probe(video, backend=self.backend)
            total, fps, height, width = info.num_frames, info.fps, info.height, info.width
            source: str | Frames = str(video)
        else:
            source = video if isinstance(video, Frames) else Frames(*video)
            arr = np.asarray(source.frames)
            if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) != len(source.indices):
                raise InputError(f"frames must be (F, H, W, 3) uint8 with F original indices; got {arr.shape} and "
                                 f"{len(source.indices)} indices")  # fmt: skip
            source = Frames(arr, [int(i) for i in source.indices], source.fps, source.total_frames)
            total, height, width = len(arr), arr.shape[1], arr.shape[2]
            fps = source.fps
            if fps is None and self.family in ("qwen2_5_vl", "qwen3_vl"):
                raise InputError(f"{self.family} needs the video's fps for frame times: pass Frames(..., fps=)")
        grid = self.check_memory(height, width, min(self.num_frames, total))
        seconds["decode"] += time.perf_counter() - t0

        t1 = time.perf_counter()  # relevance samplers: decoding the scored candidates counts here
        chosen = self.choose_frames(source, total, fps or 1.0, question)
        seconds["frame_selection"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        if isinstance(source, Frames):
            frames = source.frames[chosen]
            original = [source.indices[i] for i in chosen]
            video_frames = source.total_frames or (max(source.indices) + 1)
        else:
            frames, _ = D.read_frames(source, chosen, backend=self.backend)
            original, video_frames = chosen, total
        seconds["decode"] += time.perf_counter() - t2

        inputs, grid = self._inputs(frames, original, fps, video_frames, question)
        video_tokens, requested = self.requested_tokens(grid)
        text, prune, timer, gen_seconds = self._generate(inputs)
        seconds["vision"] = timer.vision_seconds
        seconds["prefill"] = timer.prefill_seconds
        # generate() minus the vision tower and the prefill forward: the decode steps and their overhead
        inside = sum(max(0.0, min(b, a1) - max(a, a0)) for a, b in timer.visions for a0, a1 in timer.forwards[:1])
        seconds["generation"] = max(0.0, gen_seconds - timer.first_forward_seconds - (timer.vision_seconds - inside))
        kept = prune["visual_tokens_out"] if prune else video_tokens
        stats = VideoQAStats(
            video_tokens=video_tokens, tokens_requested=requested, tokens_kept=int(kept), keep=self.keep,
            method=self.method, sampler=self.sampler, num_frames=len(chosen), video_fps=fps,
            video_frames=int(video_frames), grid_thw=grid, seconds=seconds, prune=prune,
        )  # fmt: skip
        return VideoAnswer(text=text, frames=[int(i) for i in original], stats=stats)

    def _inputs(self, frames: np.ndarray, original: list, fps: float | None, video_frames: int, question: str):
        """(model inputs, the video's (t, h, w) token grid before any spatial merge) for the chosen frames."""
        with_processor = Q.has_video_processor(self.processor)
        if self.llava:
            build = L.processor_inputs if with_processor else lambda p, *a: L.numpy_inputs(self.model, p, *a)
            return build(self.processor, frames, question, self.settings), (len(frames), *self.settings.frame_grid)
        times = Q.FrameTimes(tuple(original), float(fps or 1.0), int(video_frames))
        Q.warn_if_nonuniform(self.family, times, f"sampler {self.sampler!r}")
        if with_processor:
            inputs = Q.processor_inputs(self.processor, frames, times, question)
        else:
            inputs = Q.numpy_inputs(self.model, self.processor, frames, times, question, self.settings)
        return inputs, tuple(int(v) for v in inputs["video_grid_thw"][0].tolist())

    @torch.no_grad()
    def _generate(self, inputs: dict) -> tuple[str, dict | None, _Timer, float]:
        import vlm_prune

        p = next(self.model.parameters())
        inputs = {k: (v.to(p.device, p.dtype) if k == "pixel_values_videos" else v.to(p.device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # fmt: skip
        tok = getattr(self.processor, "tokenizer", self.processor)
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        with _Timer(self.model, _vision_module(self.model)) as timer:
            t = time.perf_counter()
            if self.method is None:
                out, prune = self.model.generate(**inputs, **kwargs), None
            else:
                with vlm_prune.pruned(self.model, self.method, keep=self.keep, **self.method_options) as handle:
                    out = self.model.generate(**inputs, **kwargs)
                prune = handle.stats.as_dict()
            gen_seconds = time.perf_counter() - t
        text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        return text, prune, timer, gen_seconds

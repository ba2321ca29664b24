"""Video front-end parts: decoding (decord / PyAV), frame samplers, text-frame scorers, Qwen video inputs."""

from .decode import VideoDecodeError, VideoInfo, available_backends, probe, read_frames
from .samplers import SAMPLERS, SamplerError, aks, bolt, clip_topk, uniform_indices
from .scorers import FrameChangeScorer, FrameScorer, OpenClipScorer, ScorerError, TransformersClipScorer

__all__ = [
    "SAMPLERS", "FrameChangeScorer", "FrameScorer", "OpenClipScorer", "SamplerError", "ScorerError",
    "TransformersClipScorer", "VideoDecodeError", "VideoInfo", "aks", "available_backends", "bolt", "clip_topk",
    "probe", "read_frames", "uniform_indices",
]  # fmt: skip

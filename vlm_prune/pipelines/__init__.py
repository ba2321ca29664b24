"""Front ends users call: `VideoQA` (video file + question -> answer with fewer tokens)."""

from .video_qa import Frames, VideoAnswer, VideoMemoryError, VideoQA, VideoQAStats

__all__ = ["Frames", "VideoAnswer", "VideoMemoryError", "VideoQA", "VideoQAStats"]

"""Video decoding for the VideoQA front end: decord first, PyAV as the fallback.

    info = probe("clip.mp4")                       # VideoInfo: fps, frame count, size, backend
    frames, info = read_frames("clip.mp4", [0, 90, 1440])   # (3, H, W, 3) uint8, in the order asked

Frame counts and fps come from the container:
- decord: `len(VideoReader)` and `get_avg_fps()`;
- PyAV: `stream.frames`, which is 0 for containers whose headers carry no count (webm, mkv, flv, mpeg, ...).
  Then the frames are counted by demuxing the stream's packets (no decoding): exact and cheap, where the
  estimate `duration * fps` is off by a few frames (the iscc-samples demo.webm: 1443.5 estimated, 1441 real).

Frame i is the i-th decoded frame in presentation order on both backends; the tests check that decord and PyAV
return identical frames for the same indices on the iscc-samples demo.mp4.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PruneError

BACKENDS = ("decord", "pyav")
#: PyAV seeks (instead of decoding on) when the next wanted frame is more than this many frames ahead
SEEK_GAP = 48


class VideoDecodeError(PruneError, ValueError):
    """A video file that no installed backend can read, or frame indices outside it."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (fps and frame count; `duration` = num_frames / fps seconds)."""

    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    backend: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def available_backends() -> list[str]:
    """The installed decoding backends, in the order they are tried."""
    names = {"decord": "decord", "pyav": "av"}
    return [b for b in BACKENDS if importlib.util.find_spec(names[b]) is not None]


def _check_path(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise VideoDecodeError(f"video file {str(p)!r} does not exist")
    return str(p)


def _order(backend: str) -> list[str]:
    if backend == "auto":
        found = available_backends()
        if not found:
            raise VideoDecodeError("no video backend is installed: pip install 'vlm-prune[video]' (decord, av)")
        return found
    if backend not in BACKENDS:
        raise VideoDecodeError(f"unknown video backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    return [backend]


# --------------------------------------------------------------------------------------------- decord


def _decord_reader(path: str):
    import decord

    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)


def _decord_info(path: str, reader) -> VideoInfo:
    h, w = reader[0].shape[:2]
    return VideoInfo(path, len(reader), float(reader.get_avg_fps()), int(h), int(w), "decord")


def _decord_read(path: str, indices: list[int]) -> tuple[np.ndarray, VideoInfo]:
    reader = _decord_reader(path)
    info = _decord_info(path, reader)
    _check_indices(indices, info)
    frames = reader.get_batch(indices).asnumpy() if indices else np.zeros((0, info.height, info.width, 3), np.uint8)
    return np.ascontiguousarray(frames, dtype=np.uint8), info


# --------------------------------------------------------------------------------------------- PyAV


def _pyav_count(path: str) -> int:
    """Frames of the first video stream, counted by demuxing packets (for headers that say 0)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _pyav_info(path: str) -> VideoInfo:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        count = int(stream.frames or 0)
        h, w = int(stream.codec_context.height), int(stream.codec_context.width)
    if count <= 0:
        count = _pyav_count(path)
    return VideoInfo(path, count, fps, h, w, "pyav")


def _pyav_sequential(path: str, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode once in presentation order, converting only the frames asked for."""
    import av

    wanted, last, got = set(indices), max(indices), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return got


def _pyav_seek(path: str, indices: list[int], fps: float) -> dict[int, np.ndarray] | None:
    """Seek to the keyframe before each far-away index and decode forward; a frame's index is
    round((pts - start) * time_base * fps). None when the stream has no usable timestamps (then decode all)."""
    import av

    got: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.time_base is None or fps <= 0:
            return None
        start = stream.start_time or 0
        step = 1.0 / (fps * float(stream.time_base))  # pts per frame
        todo = sorted(set(indices))
        position = -1  # index of the last decoded frame
        frames = None
        for target in todo:
            if frames is None or target - position > SEEK_GAP or target <= position:
                container.seek(int(start + target * step), stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is None:
                    return None
                position = round((frame.pts - start) / step)
                if position == target:
                    got[target] = frame.to_ndarray(format="rgb24")
                    break
                if position > target:
                    return None  # the seek landed past the frame: timestamps are not what they claim
            else:
                return None
    return got


def _pyav_read(path: str, indices: list[int]) -> tuple[np.ndarray, VideoInfo]:
    info = _pyav_info(path)
    _check_indices(indices, info)
    if not indices:
        return np.zeros((0, info.height, info.width, 3), np.uint8), info
    got = _pyav_seek(path, indices, info.fps) if len(set(indices)) * SEEK_GAP < max(indices) else None
    if got is None:
        got = _pyav_sequential(path, indices)
    missing = sorted(set(indices) - got.keys())
    if missing:
        raise VideoDecodeError(f"{path!r}: PyAV decoded fewer frames than the container reports; missing {missing[:5]}")
    return np.stack([got[i] for i in indices]).astype(np.uint8, copy=False), info


# --------------------------------------------------------------------------------------------- public


def _check_indices(indices: Sequence[int], info: VideoInfo) -> None:
    bad = [i for i in indices if not 0 <= int(i) < info.num_frames]
    if bad:
        raise VideoDecodeError(f"frame indices {bad[:5]} are outside the video ({info.num_frames} frames)")


def probe(path: str | Path, backend: str = "auto") -> VideoInfo:
    """fps, frame count and size of the video at `path`, from the first backend that can read it."""
    path = _check_path(path)
    errors = []
    for name in _order(backend):
        try:
            return _decord_info(path, _decord_reader(path)) if name == "decord" else _pyav_info(path)
        except Exception as e:  # noqa: BLE001 - each backend raises its own types; we try the next one
            errors.append(f"{name}: {e}")
    raise VideoDecodeError(f"could not read {path!r}: " + "; ".join(errors))


def read_frames(path: str | Path, indices: Sequence[int], backend: str = "auto") -> tuple[np.ndarray, VideoInfo]:
    """Frames `indices` (original frame numbers, any order) of `path` as (len(indices), H, W, 3) uint8.

    backend: "auto" (decord, then PyAV when decord is missing or fails on this file), "decord" or "pyav"."""
    path = _check_path(path)
    indices = [int(i) for i in indices]
    errors = []
    for name in _order(backend):
        try:
            return _decord_read(path, indices) if name == "decord" else _pyav_read(path, indices)
        except VideoDecodeError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {e}")
    raise VideoDecodeError(f"could not decode {path!r}: " + "; ".join(errors))

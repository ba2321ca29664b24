"""Text-frame relevance for the frame samplers, behind one small interface.

    scorer = TransformersClipScorer(clip_model, clip_processor)    # CLIPModel or SiglipModel + its processor
    similarity = scorer.score(frames, "where is the dog?")         # (N,) float32 cosine similarities

A `FrameScorer` is anything with `score(frames, text) -> torch.Tensor (N,)`, frames a (N, H, W, 3) uint8
array. Backends: `TransformersClipScorer` (the default, core install), `OpenClipScorer` (open_clip, the `clip`
extra; it needs torchvision) and the weight-free `FrameChangeScorer`. `TransformersClipScorer` encodes the
frames in batches of `batch_size` at the processor's (low) resolution, under `torch.no_grad()`, with a tqdm
bar when there are more than `progress_after` frames, and returns the cosine similarity of each frame
embedding with the text embedding.

transformers 5.x: `get_image_features` / `get_text_features` return an output object whose `.pooler_output` is
the projected embedding (4.x returned the tensor itself); both are accepted. The processor is the PIL-backed
one (`CLIPProcessor` / `SiglipProcessor` with `CLIPImageProcessorPil` / `SiglipImageProcessorPil`), which needs
no torchvision.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import PruneError


class ScorerError(PruneError, ValueError):
    """A frame scorer that cannot score these frames or this text."""


@runtime_checkable
class FrameScorer(Protocol):
    """Relevance of each frame to a text: higher is more relevant."""

    def score(self, frames: np.ndarray, text: str) -> torch.Tensor:
        """frames: (N, H, W, 3) uint8. Returns (N,) float32 similarities."""
        ...


def _embedding(output: Any) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` result (a tensor in transformers 4, an output in 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ScorerError(f"get_*_features returned {type(output).__name__} without a pooler_output")
    return pooled


def _starts(n: int, batch_size: int, progress_after: int):
    """Batch start offsets over n frames, with a tqdm bar past progress_after frames."""
    starts = range(0, n, batch_size)
    if n > progress_after:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="scoring frames", unit="batch")
    return starts


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ScorerError(f"frames must be (N, H, W, 3) uint8, got shape {frames.shape}")
    return frames


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TransformersClipScorer:
    """Cosine similarity of CLIP / SigLIP image and text embeddings (`transformers` backend).

    model: a `CLIPModel` or `SiglipModel` (anything with get_image_features / get_text_features).
    processor: its processor (tokenizer + image processor); SigLIP text is padded to max_length as trained.
    """

    def __init__(self, model: Any, processor: Any, batch_size: int = 32, progress_after: int = 256) -> None:
        if batch_size < 1:
            raise ScorerError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.batch_size = int(batch_size)
        self.progress_after = int(progress_after)

    def _device(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """(D,) L2-normalised text embedding."""
        device, _ = self._device()
        siglip = "siglip" in type(self.model).__name__.lower()
        kwargs: dict = {"padding": True, "truncation": True}
        if siglip:  # SigLIP was trained on text padded to its full length
            length = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 64)
            kwargs = {"padding": "max_length", "truncation": True, "max_length": int(length)}
        tokens = self.processor(text=[text], return_tensors="pt", **kwargs)
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _unit(_embedding(self.model.get_text_features(**tokens))[0].float())

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(N, D) L2-normalised frame embeddings, encoded `batch_size` frames at a time."""
        from PIL import Image

        frames = _check_frames(frames)
        device, dtype = self._device()
        out = []
        for i in _starts(len(frames), self.batch_size, self.progress_after):
            images = [Image.fromarray(f) for f in frames[i : i + self.batch_size]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
            out.append(_embedding(self.model.get_image_features(pixel_values=pixels)).float())
        return _unit(torch.cat(out)) if out else torch.zeros(0, 1)

    def score(self, frames: np.ndarray, text: str) -> torch.Tensor:
        """(N,) cosine similarity of each frame with `text`."""
        return (self.image_embeddings(frames) @ self.text_embedding(text)).float().cpu()


class FrameChangeScorer:
    """Text-agnostic relevance with no weights: how much each frame differs from the frame before it.

    score[i] = mean |frame[i] - frame[i-1]| / 255 over pixels and channels (frames compared at the size given,
    subsampled by `stride` in both directions); the first frame of a call, having no frame before it, gets its
    difference to the next one (0 for a single frame). Frames scored in several calls (VideoQA scores in
    batches of `batch_size`) restart that rule at each call's first frame.

    It marks where the picture changes (cuts, events, motion), the keyframe cue used when no text-frame model
    is at hand: the `vlm-prune video` CLI and `benchmarks/video_samplers.py` use it offline, where no
    pretrained CLIP weights can be loaded. The question is ignored.
    """

    def __init__(self, stride: int = 2, batch_size: int = 256) -> None:
        if stride < 1 or batch_size < 2:
            raise ScorerError(f"stride must be >= 1 and batch_size >= 2, got {stride} and {batch_size}")
        self.stride, self.batch_size = int(stride), int(batch_size)

    def score(self, frames: np.ndarray, text: str = "") -> torch.Tensor:
        """(N,) float32 mean absolute difference to the previous frame, in [0, 1]."""
        frames = _check_frames(frames)
        x = torch.from_numpy(np.ascontiguousarray(frames[:, :: self.stride, :: self.stride])).float() / 255.0
        if len(x) < 2:
            return torch.zeros(len(x))
        diff = (x[1:] - x[:-1]).abs().flatten(1).mean(1)
        return torch.cat([diff[:1], diff]).float()


class OpenClipScorer:
    """Cosine similarity of open_clip image and text embeddings (the `clip` extra: pip install 'vlm-prune[clip]').

    model / preprocess / tokenizer: what `open_clip.create_model_and_transforms(name, pretrained=...)` (its
    third value, the eval transform) and `open_clip.get_tokenizer(name)` return; `OpenClipScorer.create(name,
    pretrained)` builds all three. Frames go through `preprocess` as PIL images, `batch_size` at a time, into
    `model.encode_image`; the text through `tokenizer` into `model.encode_text`; both L2-normalised, so
    score = the cosine, i.e. open_clip's logits_per_image / logit_scale.

    open_clip imports torchvision at module level: it needs a torch / torchvision pair that import together
    (this project tests it in its own environment, scripts/open_clip_env.sh). `pretrained` is an open_clip
    tag or a local checkpoint file; None gives random weights (tests).
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, batch_size: int = 32,
                 progress_after: int = 256) -> None:  # fmt: skip
        if batch_size < 1:
            raise ScorerError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.batch_size, self.progress_after = int(batch_size), int(progress_after)

    @classmethod
    def create(cls, model_name: str, pretrained: str | None = None, device: str = "cpu", **kwargs: Any):
        """open_clip's model, eval transform and tokenizer for `model_name` (a registered config name)."""
        try:
            import open_clip
        except ImportError as e:
            raise ScorerError(f"OpenClipScorer needs open_clip ({e}): pip install 'vlm-prune[clip]' next to a "
                              "torch / torchvision pair that import together") from e  # fmt: skip
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), **kwargs)

    def _device(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """(D,) L2-normalised text embedding."""
        device, _ = self._device()
        return _unit(self.model.encode_text(self.tokenizer([text]).to(device))[0].float())

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(N, D) L2-normalised frame embeddings, encoded `batch_size` frames at a time."""
        from PIL import Image

        frames = _check_frames(frames)
        device, dtype = self._device()
        out = []
        for i in _starts(len(frames), self.batch_size, self.progress_after):
            batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[i : i + self.batch_size]])
            out.append(self.model.encode_image(batch.to(device, dtype)).float())
        return _unit(torch.cat(out)) if out else torch.zeros(0, 1)

    def score(self, frames: np.ndarray, text: str) -> torch.Tensor:
        """(N,) cosine similarity of each frame with `text`."""
        return (self.image_embeddings(frames) @ self.text_embedding(text)).float().cpu()

"""EVS: Efficient Video Sampling, pruning temporally static video tokens (NVIDIA, arXiv 2510.14624).

Pre-LLM, video only, the semantics of vLLM's `video_pruning_rate` (`vllm/multimodal/video_prune/evs.py`),
re-implemented here so that a user switching between the two keeps exactly the same tokens:

1. E = one video's embeddings after the projector / merger, arranged (T, H, W, D) by each token's
   (t, h, w) grid coordinate (`ctx.layout.grid_thw`); T = temporal grid steps (Qwen: 2 frames per step;
   LLaVA-OneVision / NeXT-Video: one frame), H x W the grid after the spatial merge.
2. dissimilarity[t] = 1 - cos(E[t], E[t - 1]) for t >= 1 (`torch.nn.functional.cosine_similarity`, in the
   embeddings' own dtype, as vLLM computes it); step 0 gets the sentinel 255, so it is always kept.
3. A stable descending sort over the flattened (T * H * W) dissimilarities; the first
   `retained_count((T, H, W), rate)` = max(H * W, int(T * H * W * (1 - rate))) are kept. The budget is
   global over the video, not per frame, and depends on the grid and the rate alone, so callers can size
   placeholders before the encoder runs (`retained_count`, `EVS.count`).

`keep=f` means `rate = 1 - f`. Images in the same prompt are left alone; `evs+divprune` prunes the video with
EVS, then every media item's survivors with DivPrune (a "+" composition splits `keep` geometrically).

Positions: kept tokens keep their original (t, h, w) M-RoPE coordinates and the text after the video
continues as it would unpruned (policy "preserve"). vLLM differs there: after pruning it recomputes the
positions of the text after the video from base + llm_grid_w (`recompute_mrope_positions`), i.e. as if the
video were one frame wide; our text positions therefore equal the unpruned model's, vLLM's do not.

`space="pixel"` is the paper's own variant: the dissimilarity of a token is the mean absolute (L1) difference
of its pixels (normalised RGB, every patch of its merge group, both frames of a temporal patch) to the same
pixels one temporal step earlier, taken from the vision tower's input; the same count and sort follow (the
paper's percentile threshold on the difference is this top-count at the rate's percentile). Needs the
"pixels" signal (Qwen-VL families).

Defaults: `rate=0.75` (the paper's headline setting, Cosmos-Reason1-7B) when neither `rate` nor `keep` is given.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm_prune.engine.context import VIDEO, SelectionContext
from vlm_prune.errors import MethodOptionError, PruneError
from vlm_prune.methods.base import Method, Stage
from vlm_prune.methods.registry import register

DEFAULT_RATE = 0.75
FIRST_STEP_SENTINEL = 255.0
SPACES = ("embedding", "pixel")


def check_rate(rate: object) -> float:
    """`rate` as a float in [0, 1), or a MethodOptionError that says what to pass."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) < 1.0:
        raise MethodOptionError(
            f"EVS rate={rate!r}: the pruning rate must be a number in [0, 1) (0 keeps every token, 0.75 prunes "
            "three quarters); or pass keep=f for rate = 1 - f"
        )
    return float(rate)


def retained_count(grid_thw: tuple[int, int, int] | torch.Tensor, rate: float, spatial_merge_size: int = 1) -> int:
    """Video tokens EVS keeps for a video grid, from the grid and the rate alone.

    grid_thw: (T, H, W): temporal steps and the token grid, or the vision grid before a spatial merge of
        `spatial_merge_size` (Qwen's `video_grid_thw` row with spatial_merge_size=2), as vLLM takes it.
    Returns max(tokens_per_frame, int(T * tokens_per_frame * (1 - rate))), the same arithmetic as vLLM's
    `compute_retained_tokens_count`, so both size placeholders identically.
    """
    rate = check_rate(rate)
    t, h, w = (int(v) for v in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw))
    tokens_per_frame = (h // spatial_merge_size) * (w // spatial_merge_size)
    return max(tokens_per_frame, int(tokens_per_frame * t * (1 - rate)))


def temporal_dissimilarity(grid_features: torch.Tensor) -> torch.Tensor:
    """(T, H, W, D) embeddings -> (T, H, W) EVS dissimilarity: 1 - cos to the previous step, 255 at t = 0.

    Computed in the features' dtype (vLLM runs it on the model-dtype embeddings).
    """
    dissimilarity = 1 - F.cosine_similarity(grid_features[1:], grid_features[:-1], dim=-1)
    first = torch.full_like(grid_features[:1, ..., 0], FIRST_STEP_SENTINEL)
    return torch.cat([first, dissimilarity], dim=0)


def retention_mask(dissimilarity: torch.Tensor, count: int) -> torch.Tensor:
    """(T, H, W) dissimilarity -> (T*H*W,) bool, True for the `count` largest (stable: ties to the earlier)."""
    flat = dissimilarity.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    keep_mask = torch.zeros_like(flat, dtype=torch.bool)
    keep_mask[order[:count]] = True
    return keep_mask


def video_grid_order(grid_thw: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(n, 3) (t, h, w) coordinates of one video's tokens -> (n,) raster index t*H*W + h*W + w.

    Raises PruneError unless the tokens cover the (T, H, W) grid exactly once (EVS needs whole steps).
    """
    t, h, w = grid
    flat = (grid_thw[:, 0] * h + grid_thw[:, 1]) * w + grid_thw[:, 2]
    if flat.numel() != t * h * w or not torch.equal(torch.sort(flat).values, torch.arange(t * h * w)):
        raise PruneError(
            f"EVS needs every token of the video grid {grid}, found {flat.numel()} of {t * h * w}; run EVS first "
            "in a composition (e.g. 'evs+divprune') and pass the processor's video inputs unchanged"
        )
    return flat


def pixel_dissimilarity(grid_pixels: torch.Tensor) -> torch.Tensor:
    """(T, H, W, P) pixel values per token -> (T, H, W) mean L1 difference to the previous step; 255 at t = 0."""
    difference = (grid_pixels[1:].float() - grid_pixels[:-1].float()).abs().mean(dim=-1)
    first = torch.full_like(difference[:1], FIRST_STEP_SENTINEL)
    return torch.cat([first, difference], dim=0).to(grid_pixels.dtype if grid_pixels.is_floating_point() else None)


def evs_keep_mask(
    features: torch.Tensor,
    grid_thw: torch.Tensor,
    grid: tuple[int, int, int],
    rate: float,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """EVS's keep mask over one video's tokens, in the order they are given.

    features: (n, D) the video's embeddings; grid_thw: (n, 3) their (t, h, w); grid: (T, H, W).
    pixels: (n, P) per-token pixels for the pixel-space variant, else None.
    Returns (n,) bool with exactly `retained_count(grid, rate)` True.
    """
    flat = video_grid_order(grid_thw.cpu(), grid)
    t, h, w = grid
    source = features if pixels is None else pixels
    raster = bool(torch.equal(flat, torch.arange(flat.numel())))  # the usual case: tokens already in raster order
    arranged = source if raster else source[torch.argsort(flat).to(source.device)]
    arranged = arranged.reshape(t, h, w, -1)
    dissimilarity = temporal_dissimilarity(arranged) if pixels is None else pixel_dissimilarity(arranged)
    keep_raster = retention_mask(dissimilarity, retained_count(grid, rate))
    return keep_raster if raster else keep_raster[flat.to(keep_raster.device)]


@dataclass
class EVS(Method):
    """EVS (arXiv 2510.14624): drop the video tokens that changed least since the previous temporal step.

    rate: pruning rate q in [0, 1) (vLLM's `video_pruning_rate`); `keep=f` gives rate = 1 - f. Default 0.75.
    space: "embedding" (vLLM, default: cosine on the projected embeddings) or "pixel" (the paper's L1 on pixels).
    """

    rate: float | None = None
    space: str = "embedding"
    keep: float | int | None = None
    layer = 0
    media = "video"
    name = "evs"

    def __post_init__(self) -> None:
        if self.rate is not None:
            check_rate(self.rate)
        if self.space not in SPACES:
            raise MethodOptionError(f"EVS space={self.space!r}; choose one of {SPACES}")

    def resolved_rate(self) -> float:
        """The pruning rate from `rate` or `keep` (an explicit conflict between the two is refused)."""
        if self.keep is None:
            return DEFAULT_RATE if self.rate is None else check_rate(self.rate)
        if isinstance(self.keep, numbers.Integral) and not isinstance(self.keep, bool):
            raise MethodOptionError(
                f"EVS takes keep as a fraction of the video tokens (keep=0.25 means rate 0.75), got keep={self.keep}"
            )
        from_keep = check_rate(1.0 - float(self.keep))
        if self.rate is not None and abs(from_keep - float(self.rate)) > 1e-12:
            raise MethodOptionError(f"EVS got rate={self.rate} and keep={self.keep} (rate {from_keep}); pass one")
        return from_keep

    @staticmethod
    def count(grid_thw: tuple[int, int, int] | torch.Tensor, rate: float, spatial_merge_size: int = 1) -> int:
        """`retained_count`: tokens kept for one video grid (the mask's sum always equals it)."""
        return retained_count(grid_thw, rate, spatial_merge_size)

    def stages(self) -> list[Stage]:
        rate = self.resolved_rate()

        def select(ctx: SelectionContext) -> torch.Tensor:
            return self.select_with_rate(ctx, rate)

        needs = frozenset({"pixels"}) if self.space == "pixel" else frozenset()
        return [Stage(layer=0, select=select, keep=None, needs=needs, name=self.name, counts_itself=True)]

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return self.select_with_rate(ctx, self.resolved_rate())

    def select_with_rate(self, ctx: SelectionContext, rate: float) -> torch.Tensor:
        """Keep mask over the sample's visual tokens: EVS on each video item, every image token kept."""
        layout = ctx.layout
        keep_mask = torch.ones(ctx.num_visual, dtype=torch.bool, device=ctx.visual_features.device)
        for item, grid in enumerate(layout.media_grid):
            members = ((layout.media_index == item) & (layout.kind == VIDEO)).nonzero(as_tuple=True)[0]
            if members.numel() == 0:
                continue
            pixels = None
            if self.space == "pixel":
                if ctx.pixels is None:
                    raise PruneError("EVS space='pixel' needs the vision tower's pixel input, which was not recorded")
                pixels = ctx.pixels[members.to(ctx.pixels.device)]
            member_index = members.to(keep_mask.device)
            keep_mask[member_index] = evs_keep_mask(
                ctx.visual_features[member_index], layout.grid_thw[members], tuple(grid), rate, pixels
            ).to(keep_mask.device)
        return keep_mask


register("evs", EVS, "EVS (2510.14624): drop video tokens that changed least since the previous step (vLLM's rule).")

"""VisionZip baseline: dominant plus contextual tokens (arXiv 2412.04467).

Where: pre-LLM (layer 0), per media item. Signals: "vision_attention" — the engine hooks the INPUT of
the vision layer that feeds the projector and recomputes, with `adapters.vision_signals`, the
CLS -> patch attention (heads summed) and that layer's keys; the tower is never asked for attention
weights. Towers without a CLS token (SigLIP, the Qwen2-VL/2.5-VL ViT) give instead the mean attention
each token RECEIVES (heads summed, averaged over queries), the fallback VisionZip's own non-CLS ports
use; on Qwen it is per merged token (mean over the 2x2 patch group), with keys averaged likewise.

Algorithm (`visionzip_plan`, `merge_groups`, `visionzip_select`), for one media item of N tokens and a
budget of `dominant` + `contextual` tokens:
1. Dominant: the top-`dominant` tokens by `ctx.vision_attention` (ties to the earlier token).
2. Contextual: the M remaining tokens in sequence order; keys `ctx.vision_keys` L2-normalised; targets
   at indices arange(0, M, max(1, M // contextual))[:contextual]; every other remaining token joins the
   target of highest cosine similarity (argmax, ties to the first target); each group is merged.
3. Returns a `Selection`: kept = dominant + targets in sequence order; features = the original ones for
   dominant tokens and the merged group for targets (a merged token sits at its target's position).

Defaults: LLaVA-1.5 `dominant=54, contextual=10` (64 tokens), the paper's setting; `keep=None` means
64 tokens per media item. For any other budget b the split keeps the same 54:10 proportion:
dominant = round_half_up(b · 54/64), contextual = b − dominant (128 -> 108 + 20 and 192 -> 162 + 30,
the paper's own settings). Explicit `dominant`/`contextual` set the proportion (or the counts, when
they add up to the budget).

Deviations from the released code (VisionZip `clip_encoder.py`/`utils.py`):
- Merge: we take the plain group mean (target and its members, `merge="mean"`, as the paper describes
  the merge). The released code outputs target + mean(members) (`contextual_tokens = target_hidden +
  aggregated_hidden`), i.e. the target counted at full weight on top of the members' mean; available as
  `merge="target_plus_mean"`.
- Merge space: by default we merge the PROJECTED embeddings (`ctx.visual_features`); the released code
  merges the pre-projector hidden states (CLIP layer −2 outputs) and then projects, which differs
  because the projector is non-linear. `merge_space="projector_input"` does it their way: it averages
  `ctx.projector_inputs` and passes the result through `ctx.projector` (needs the "projector" signal).
- The released code also keeps the CLS token's feature (65 tokens at "64"); HF LLaVA drops CLS before
  the projector, so the CLS has no placeholder and is not kept here: the budget is exactly 64.
- Video: the whole video item is one group (no per-frame budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm_prune.engine.context import Selection, SelectionContext
from vlm_prune.errors import BudgetError, MethodOptionError, PruneError
from vlm_prune.methods.base import Method, Stage, per_media, topk_mask
from vlm_prune.methods.registry import register

DOMINANT, CONTEXTUAL = 54, 10
MERGES = ("mean", "target_plus_mean")
MERGE_SPACES = ("projected", "projector_input")


def split_budget(budget: int, dominant_share: float = DOMINANT / (DOMINANT + CONTEXTUAL)) -> tuple[int, int]:
    """budget -> (dominant, contextual) in the given proportion (dominant rounded half up)."""
    budget = max(0, int(budget))
    dominant = min(budget, math.floor(budget * dominant_share + 0.5))
    return dominant, budget - dominant


def visionzip_plan(
    attn: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens are dominant, which are contextual targets, and who merges into whom.

    attn: (N,) dominance scores; keys: (N, d_k).
    Returns (dominant_mask (N,) bool, target_index (c,) long sequence indices in increasing order,
    group (N,) long: for every non-dominant token the position in `target_index` of its group, -1 for
    dominant tokens). c = min(contextual, N - dominant).
    """
    n = attn.numel()
    dominant_mask = topk_mask(attn, dominant)
    rest = (~dominant_mask).nonzero(as_tuple=True)[0]
    group = torch.full((n,), -1, dtype=torch.long, device=attn.device)
    m = rest.numel()
    c = max(0, min(int(contextual), m))
    if c == 0:
        return dominant_mask, rest[:0], group
    step = max(1, m // c)
    target_local = torch.arange(0, m, step, device=attn.device)[:c]
    is_target = torch.zeros(m, dtype=torch.bool, device=attn.device)
    is_target[target_local] = True
    metric = F.normalize(keys[rest].float(), dim=-1)
    similarity = metric[~is_target] @ metric[target_local].T  # (m - c, c)
    local_group = torch.empty(m, dtype=torch.long, device=attn.device)
    local_group[target_local] = torch.arange(c, device=attn.device)
    local_group[~is_target] = similarity.argmax(dim=1)
    group[rest] = local_group
    return dominant_mask, rest[target_local], group


def merge_groups(
    features: torch.Tensor, target_index: torch.Tensor, group: torch.Tensor, merge: str = "mean"
) -> torch.Tensor:
    """Merged feature of each contextual group: features (N, D) -> (c, D) float32.

    merge="mean": mean of the target and its members. merge="target_plus_mean": target + mean of the
    members (the released code; just the target when it has no members).
    """
    c = target_index.numel()
    feats = features.float()
    member = group >= 0
    sums = torch.zeros(c, feats.shape[-1], dtype=torch.float32, device=feats.device)
    sums.index_add_(0, group[member], feats[member])
    counts = torch.bincount(group[member], minlength=c).to(feats.dtype).unsqueeze(-1)
    if merge == "mean":
        return sums / counts
    if merge == "target_plus_mean":
        targets = feats[target_index]
        others_sum = sums - targets
        others_count = counts - 1
        return targets + others_sum / others_count.clamp(min=1)
    raise MethodOptionError(f"merge must be one of {MERGES}, got {merge!r}")


def visionzip_select(
    attn: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: str = "mean",
) -> Selection:
    """VisionZip for one media item: attn (N,), keys (N, d_k), features (N, D) -> `Selection` over N.

    Keeps min(N, dominant + contextual) tokens; features (K, D) in sequence order, original for
    dominant tokens, merged for contextual targets.
    """
    n = attn.numel()
    if dominant + contextual >= n:
        return Selection(torch.ones(n, dtype=torch.bool, device=attn.device), None)
    dominant_mask, target_index, group = visionzip_plan(attn, keys, dominant, contextual)
    keep_mask = dominant_mask.clone()
    keep_mask[target_index] = True
    new_features = features.clone()
    if target_index.numel():
        new_features[target_index] = merge_groups(features, target_index, group, merge).to(features.dtype)
    return Selection(keep_mask, new_features[keep_mask])


@dataclass(repr=True)
class VisionZip(Method):
    """VisionZip (arXiv 2412.04467): dominant tokens by vision attention + merged contextual tokens.

    keep: tokens per media item (int) or fraction in (0, 1]; None = dominant + contextual (64).
    dominant, contextual: the LLaVA-1.5 split 54 + 10; other budgets keep their proportion.
    merge: "mean" (group mean, default) or "target_plus_mean" (released code).
    merge_space: "projected" (merge projected embeddings, default) or "projector_input" (merge the
        projector inputs, then project, as the released code).
    """

    keep: float | int | None = None
    dominant: int | None = None
    contextual: int | None = None
    merge: str = "mean"
    merge_space: str = "projected"

    name = "visionzip"
    layer = 0
    needs = frozenset({"vision_attention"})

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise MethodOptionError(f"VisionZip merge must be one of {MERGES}, got {self.merge!r}")
        if self.merge_space not in MERGE_SPACES:
            raise MethodOptionError(f"VisionZip merge_space must be one of {MERGE_SPACES}, got {self.merge_space!r}")
        for label, value in (("dominant", self.dominant), ("contextual", self.contextual)):
            if value is not None and (isinstance(value, bool) or int(value) < 0):
                raise BudgetError(f"VisionZip {label} must be a count >= 0, got {value!r}")

    def _counts(self) -> tuple[int, int]:
        dominant = DOMINANT if self.dominant is None else int(self.dominant)
        contextual = CONTEXTUAL if self.contextual is None else int(self.contextual)
        if dominant + contextual == 0:
            raise BudgetError("VisionZip needs dominant + contextual > 0")
        return dominant, contextual

    def split(self, budget: int) -> tuple[int, int]:
        """A media item's budget -> (dominant, contextual) (see the module docstring)."""
        dominant, contextual = self._counts()
        if budget == dominant + contextual:
            return dominant, contextual
        return split_budget(budget, dominant / (dominant + contextual))

    def stages(self) -> list[Stage]:
        keep = self.keep if self.keep is not None else sum(self._counts())
        needs = set(self.needs) | ({"projector"} if self.merge_space == "projector_input" else set())
        return [Stage(layer=0, select=self.select, keep=keep, needs=frozenset(needs), name=self.name)]

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        if ctx.vision_attention is None or ctx.vision_keys is None:
            raise PruneError(
                "VisionZip needs the vision tower's attention and keys (needs={'vision_attention'}); this "
                "adapter did not provide them"
            )
        attn, keys = ctx.vision_attention, ctx.vision_keys
        if self.merge_space == "projector_input" and (ctx.projector_inputs is None or ctx.projector is None):
            raise PruneError("VisionZip merge_space='projector_input' needs the 'projector' signal from the adapter")

        def choose(members: torch.Tensor, budget: int) -> Selection:
            dominant, contextual = self.split(budget)
            if self.merge_space == "projected":
                return visionzip_select(
                    attn[members], keys[members], ctx.visual_features[members], dominant, contextual, self.merge
                )
            return self._select_projector_input(ctx, members, dominant, contextual)

        return per_media(ctx, choose)

    def _select_projector_input(
        self, ctx: SelectionContext, members: torch.Tensor, dominant: int, contextual: int
    ) -> Selection:
        attn, keys = ctx.vision_attention[members], ctx.vision_keys[members]  # type: ignore[index]
        features = ctx.visual_features[members]
        n = members.numel()
        if dominant + contextual >= n:
            return Selection(torch.ones(n, dtype=torch.bool, device=features.device), None)
        dominant_mask, target_index, group = visionzip_plan(attn, keys, dominant, contextual)
        keep_mask = dominant_mask.clone()
        keep_mask[target_index] = True
        new_features = features.clone()
        if target_index.numel():
            inputs = ctx.projector_inputs[members]  # type: ignore[index]
            merged = merge_groups(inputs, target_index, group, self.merge).to(inputs.dtype)
            new_features[target_index] = ctx.projector(merged).to(features.dtype)  # type: ignore[misc]
        return Selection(keep_mask, new_features[keep_mask])


register(
    "visionzip",
    VisionZip,
    "VisionZip (arXiv 2412.04467): dominant tokens by vision-tower attention plus merged contextual tokens.",
)

"""Random baseline: a uniform random subset of each media item's visual tokens.

Not from a paper; METHODS.md lists it as the baseline that must always be reported. Defaults:
pre-LLM (`layer=0`), no default budget (pass `keep`). Randomness comes from `ctx.generator()`,
which is seeded from the sample's seed and the stage only, so the same sample gets the same tokens
whatever its position in the batch. Media items are drawn in order from one generator; with
`per_item=True` every item draws from a fresh generator (the same seed), so an item's subset does not
depend on the items before it in the prompt: what the vLLM plugin does (vLLM encodes and caches each
item apart from its prompt), so `apply(model, "random", keep=k, per_item=True)` keeps its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_prune.engine.context import SelectionContext
from vlm_prune.methods.base import Method, per_media
from vlm_prune.methods.registry import register


def random_subset_mask(num_tokens: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random k-subset of `num_tokens` tokens -> (num_tokens,) bool mask (CPU).

    `k` is clamped to [0, num_tokens].
    """
    k = max(0, min(int(k), num_tokens))
    order = torch.randperm(num_tokens, generator=generator)
    keep_mask = torch.zeros(num_tokens, dtype=torch.bool)
    keep_mask[order[:k]] = True
    return keep_mask


@dataclass(repr=True)
class RandomPrune(Method):
    """Keep a seeded uniform random subset of each media item's visual tokens.

    keep: fraction in (0, 1] or count per media item (None: set by `apply()`).
    layer: 0 = pre-LLM (default); k = on the input of decoder layer k.
    per_item: False (default) = the items of a sample draw in order from one generator; True = each
        item from a fresh generator of the same seed (independent of the items before it; vLLM's plugin).
    """

    keep: float | int | None = None
    layer: int = 0
    per_item: bool = False
    name = "random"

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        generator = ctx.generator()
        device = ctx.visual_features.device

        def choose(members: torch.Tensor, budget: int) -> torch.Tensor:
            source = ctx.generator() if self.per_item else generator
            return random_subset_mask(members.numel(), budget, source).to(device)

        return per_media(ctx, choose)  # type: ignore[return-value]


register("random", RandomPrune, "Uniform random subset per media item (seeded); the baseline to report.")

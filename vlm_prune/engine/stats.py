"""Statistics of a pruned forward: tokens per stage, prefill FLOPs, KV bytes, selection time.

FLOPs of one decoder layer over n tokens (2 FLOPs per multiply-accumulate), with hidden size d,
query width d_q = H * head_dim, key/value width d_kv = H_kv * head_dim (GQA) and MLP width m:

    F(n) = 2 * [ n*d*(2*d_q + 2*d_kv)      # q, k, v, o projections (o maps d_q -> d)
                 + 2 * n^2 * d_q           # QK^T and AV, counted over the full square as FastV does
                 + 3 * n*d*m ]             # SwiGLU: gate, up, down

This is FastV's 4nd^2 + 2n^2d + 2ndm with GQA and the three-matrix MLP, times two. The prefill FLOPs are
the sum over layers of F(n_layer), with each layer's own n (tokens after the stages before it), summed
over the samples of the batch (padding excluded). The LM head is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from vlm_prune.engine.records import defaults, fresh


@dataclass
class LayerShape:
    hidden: int
    q_width: int
    kv_width: int
    mlp: int
    num_layers: int

    @classmethod
    def from_config(cls, config) -> LayerShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            hidden=config.hidden_size,
            q_width=heads * head_dim,
            kv_width=kv_heads * head_dim,
            mlp=config.intermediate_size,
            num_layers=config.num_hidden_layers,
        )

    def layer_flops(self, n: int) -> int:
        d = self.hidden
        macs = n * d * (2 * self.q_width + 2 * self.kv_width) + 2 * n * n * self.q_width + 3 * n * d * self.mlp
        return 2 * macs

    def prefill_flops(self, tokens_per_layer: list[int]) -> int:
        return sum(self.layer_flops(n) for n in tokens_per_layer)


@dataclass
class StageStats:
    name: str
    layer: int
    tokens_in: list[list[int]]  # per sample, per media item
    tokens_out: list[list[int]]
    select_seconds: float = 0.0

    @property
    def total_in(self) -> int:
        return sum(map(sum, self.tokens_in))

    @property
    def total_out(self) -> int:
        return sum(map(sum, self.tokens_out))


@dataclass
class PruneStats:
    """What `handle.stats` reports about the last prefill that held media."""

    stages: list[StageStats] = field(default_factory=list)
    visual_tokens_in: int = 0
    visual_tokens_out: int = 0
    prefill_flops_unpruned: int = 0
    prefill_flops: int = 0
    kv_cache_bytes: int = 0
    kv_cache_bytes_unpruned: int = 0
    select_seconds: float = 0.0
    equivalent_average_tokens: float = 0.0
    forwards: int = 0

    @classmethod
    def of_prefill(cls, visual_tokens_in: int) -> PruneStats:
        """The stats a prefill starts with (`PruneStats(visual_tokens_in=...)`, without the generated __init__)."""
        return fresh(cls, {**_PRUNE_STATS_DEFAULTS, "stages": [], "visual_tokens_in": visual_tokens_in})

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / self.prefill_flops_unpruned if self.prefill_flops_unpruned else 1.0

    @property
    def keep_ratio(self) -> float:
        return self.visual_tokens_out / self.visual_tokens_in if self.visual_tokens_in else 1.0

    @property
    def image_token_flops_reduction(self) -> float:
        """Share of the image-token work removed: 1 - (visual tokens per layer, averaged over the layers and
        the samples) / (visual tokens per sample). Counts token-layers, the measure LVLM_CSP reports; a stage
        that brings tokens back (re-entry) adds them back to its layers."""
        if not self.stages or not self.visual_tokens_in:
            return 0.0
        per_sample = self.visual_tokens_in / len(self.stages[0].tokens_in)
        return 1.0 - self.equivalent_average_tokens / per_sample

    def as_dict(self) -> dict:
        out = asdict(self)
        out["flops_ratio"] = self.flops_ratio
        out["keep_ratio"] = self.keep_ratio
        out["image_token_flops_reduction"] = self.image_token_flops_reduction
        return out

    def __str__(self) -> str:
        lines = [
            f"visual tokens {self.visual_tokens_in} -> {self.visual_tokens_out} ({self.keep_ratio:.1%})",
            f"prefill FLOPs {self.prefill_flops_unpruned:.3e} -> {self.prefill_flops:.3e} ({self.flops_ratio:.1%})",
            f"KV cache {self.kv_cache_bytes_unpruned / 2**20:.2f} MiB -> {self.kv_cache_bytes / 2**20:.2f} MiB",
            f"selection time {self.select_seconds * 1e3:.2f} ms",
        ]
        for stage in self.stages:
            lines.append(f"  stage {stage.name} @ layer {stage.layer}: {stage.total_in} -> {stage.total_out}")
        return "\n".join(lines)


_PRUNE_STATS_DEFAULTS = defaults(PruneStats)


def finish_prefill_stats(
    stats: PruneStats, shape: LayerShape, num_layers: int, mask0, length0: int, offsets: list[int],
    tokens_out: list[list[int]],
) -> None:
    """Fill the token count out and the FLOPs fields of a prefill's `stats` from its stages (run when `handle.stats`
    is read, off the hot path).

    mask0: (B, L0) host 2-D mask of the unpruned input, or None (every token real); offsets: (B + 1) where each
    sample's visual tokens start among the batch's (before pruning); tokens_out: the visual tokens per media item of
    each sample left at the end of the prefill.
    """
    stats.visual_tokens_out = sum(map(sum, tokens_out))
    visual_in = [end - start for start, end in zip(offsets, offsets[1:])]
    batch = len(visual_in)
    per_sample_len0 = mask0.sum(dim=1).tolist() if mask0 is not None else [length0] * batch
    # tokens per layer per sample: start from the unpruned count, subtract each stage's removals
    removed_before: dict[int, list[int]] = {}
    for stage_stats in stats.stages:
        removed = [sum(a) - sum(b) for a, b in zip(stage_stats.tokens_in, stage_stats.tokens_out)]
        previous = removed_before.get(stage_stats.layer, [0] * batch)
        removed_before[stage_stats.layer] = [p + r for p, r in zip(previous, removed)]
    flops_after = flops_before = 0
    visual_per_layer_total = 0.0
    for sample in range(batch):
        counts, current = [], per_sample_len0[sample]
        for layer in range(num_layers):
            current -= removed_before.get(layer, [0] * batch)[sample]
            counts.append(current)
        flops_after += shape.prefill_flops(counts)
        flops_before += shape.prefill_flops([per_sample_len0[sample]] * num_layers)
        visual_per_layer_total += sum(visual_in[sample] - (per_sample_len0[sample] - n) for n in counts) / num_layers
    stats.prefill_flops = flops_after
    stats.prefill_flops_unpruned = flops_before
    stats.equivalent_average_tokens = visual_per_layer_total / max(batch, 1)
    stats.select_seconds = sum(stage.select_seconds for stage in stats.stages)


def cache_bytes(cache, length0: int) -> tuple[int, int]:
    """(bytes the cache's keys and values hold, bytes they would hold for `length0` positions); shapes only."""
    # (one comprehension over the layers, those without tensors skipped: this runs once per prefill, per layer)
    sizes = [(layer.keys.nbytes, layer.values.nbytes, layer.keys.shape[-2]) for layer in cache.layers
             if isinstance(getattr(layer, "keys", None), torch.Tensor)]  # fmt: skip
    total = sum([keys + values for keys, values, _ in sizes])
    return total, sum([keys // (length or 1) * 2 for keys, _, length in sizes]) * length0

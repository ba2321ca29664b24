"""The attention rows of one in-LLM stage, recomputed for the whole batch at once.

In-LLM scorers read the attention that one query token pays at layer k-1 (FastV, AdaToken-3D: the last token;
CATP: the last token at layers k-1 and k). Recomputed per row (`attention_rows.stage_rows_fn`), that is one
layer norm, one q projection, RoPE, one matmul and one softmax per row: ~20 small ops per row, 160 at batch 8,
each a kernel launch on a GPU and tens of microseconds of host time on a CPU. Under left padding (the usual
batch) every row's last token sits at the same padded slot, L-1, so ONE batched recompute over (B, L), with the
padding masked out of the keys, gives every row its row: a row's result is a view of the batch's
(B, H, Q, L) probabilities at its valid slots.

`StageAttention` holds one stage's recorded layer inputs and memoises the batched rows per (layer, query slots).
The engine's row context (`stage_run._RowContext.attention_rows`) asks it first when the method queries host
integers (`ctx.last_index` is one) on a row whose valid slots are one run ending at L-1; anything else (a tensor
of queries, a row with gaps, a padded layout it cannot see) takes the per-row path, as before.

Same values as the per-row path up to float rounding: the batched q projection and the softmax over L (padding
contributing exact zeros) may round differently from their per-row shapes (tests compare at 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlm_prune.engine.attention_rows import LayerInput, cached_keys, recompute_attention_rows, recorded_layer


class StageAttention:
    """The attention rows of one stage's recorded layers (k-1 and, if recorded, k) for every row of the batch.

    layers: the decoder layers; previous / current: the `LayerInput` of layer k-1 (its cache holds its keys) and of
    layer k (the stage's own input, keys recomputed), or None; key_mask: (B, L) the forward's 2-D mask (nonzero =
    a real token) over the current slots.
    """

    def __init__(self, layers: Sequence[nn.Module], previous: LayerInput, current: LayerInput | None,
                 key_mask: torch.Tensor) -> None:  # fmt: skip
        self.layers, self.previous, self.current = layers, previous, current
        self.key_mask = key_mask
        self._memo: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def rows(self, row: int, first: int, queries: Sequence[int], layer: int) -> torch.Tensor | None:
        """(H, Q, L - first) the rows of batch row `row`, whose valid slots are first..L-1, at its own (Q,) query
        positions `queries` (host ints, 0 <= q < L - first), from layer `layer`; None when this layer was not
        recorded or its shapes do not match the mask (the caller then takes the per-row path)."""
        rows = self.batch(tuple(first + query for query in queries), layer)
        return None if rows is None else rows[row, :, :, first:]

    def batch(self, slots: tuple[int, ...], layer: int) -> torch.Tensor | None:
        """(B, H, Q, L) the rows of every batch row at the padded (Q,) query `slots` (host ints), from layer
        `layer`, memoised; None when this layer was not recorded or its shapes do not match the mask."""
        recorded = recorded_layer(self.previous, self.current, layer)
        if recorded is None or tuple(recorded[1].shape[:2]) != tuple(self.key_mask.shape):
            return None
        key = (layer, slots)
        rows = self._memo.get(key)
        if rows is None:
            rows = self._memo[key] = batch_rows(self.layers, recorded, slots, self.key_mask)
        return rows


def batch_rows(layers: Sequence[nn.Module], recorded: LayerInput, slots: Sequence[int],
               key_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, H, Q, L) float32 attention probabilities of the recorded layer at the padded (Q,) query `slots` of
    every row, over the row's real keys (`key_mask` (B, L), nonzero = real; padding gets 0). The layer's cached
    keys are used when they cover exactly the recorded slots (layer k-1 has run), else recomputed (layer k)."""
    layer_index, hidden_in, position_embeddings, _ = recorded
    layer = layers[layer_index]
    keys = cached_keys(recorded)
    query_index = torch.tensor(slots, dtype=torch.long).to(hidden_in.device, non_blocking=True)  # (an upload)
    with torch.no_grad():
        normed = layer.input_layernorm(hidden_in)
        return recompute_attention_rows(layer.self_attn, normed, position_embeddings, query_index, key_mask != 0,
                                        keys=keys)  # fmt: skip

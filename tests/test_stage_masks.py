"""`engine/masks.py`: the 4-D mask after an in-LLM stage equals transformers' own, and the None answers it
remembers are exactly transformers' None answers."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils as masking
from transformers import DynamicCache

from vlm_prune.engine.masks import StageMasks
from vlm_prune.toy_models import build_tiny


def _reference(config, hidden, mask, cache, positions, layer_idx, plain):
    return masking.create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=None if plain else mask, cache=cache,
        position_ids=positions, layer_idx=layer_idx, allow_is_causal_skip=plain,
    )  # fmt: skip


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_masks_equal_transformers_and_skip_only_its_none_answers(implementation, family, monkeypatch):
    config = build_tiny(family, attn_implementation=implementation).model.language_model.config
    masks = StageMasks(config)
    calls = []
    original = masking.create_causal_mask

    def spy(**kwargs):
        calls.append(kwargs["allow_is_causal_skip"])
        return original(**kwargs)

    monkeypatch.setattr(masking, "create_causal_mask", spy)
    generator = torch.Generator().manual_seed(0)
    for batch, length, padded_rows, with_cache in [(1, 7, 0, True), (2, 9, 1, True), (2, 9, 0, False), (3, 5, 0, True)]:
        hidden = torch.randn(batch, length, config.hidden_size, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[:padded_rows, :2] = 0  # left padding in the first rows
        plain = padded_rows == 0
        cache = DynamicCache(config=config) if with_cache else None
        positions = torch.arange(length).expand(batch, -1)
        layer_idx = 1 if with_cache else None
        for repeat in range(2):
            calls.clear()
            got = masks.build(hidden, mask, cache, positions, layer_idx, plain)
            expected = _reference(config, hidden, mask, cache, positions, layer_idx, plain)
            assert _same(got, expected)
            # a None answer for an unpadded signature is remembered: the second build does not ask transformers
            skipped = repeat == 1 and plain and expected is None
            assert len(calls) == (1 if skipped else 2)
    if implementation == "eager":  # eager always needs a 4-D mask: nothing is ever skipped
        assert len(masks._none) == 0
    else:
        assert len(masks._none) > 0

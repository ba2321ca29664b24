"""`engine/masks.py`: the 4-D mask after an in-LLM stage equals transformers' own, the None answers it
remembers are exactly transformers' None answers, and its own padded mask equals `create_causal_mask` wherever it
answers (and answers None, leaving it to transformers, elsewhere)."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils as masking
from transformers import DynamicCache

from vlm_prune.engine.masks import StageMasks, padded_causal_mask
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
            # a None answer for an unpadded signature is remembered: the second build does not ask transformers;
            # a padded one is built by `padded_causal_mask` (plain dynamic cache or none): transformers is not asked
            skipped = (repeat == 1 and plain and expected is None) or not plain
            assert len(calls) == (1 if skipped else 2)
    if implementation == "eager":  # eager always needs a 4-D mask: nothing is ever skipped
        assert len(masks._none) == 0
    else:
        assert len(masks._none) > 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("past", [0, 3])
def test_padded_causal_mask_equals_create_causal_mask(implementation, dtype, past):
    config = build_tiny("llava", attn_implementation=implementation).model.language_model.config
    generator = torch.Generator().manual_seed(past)
    batch, length = 3, 6
    hidden = torch.randn(batch, length, config.hidden_size, generator=generator).to(dtype)
    mask = (torch.rand(batch, past + length, generator=generator) > 0.3).long()
    mask[:, -1] = 1  # every row's last query attends to itself
    cache = DynamicCache(config=config)
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    if past:
        for layer in range(config.num_hidden_layers):
            cache.update(torch.zeros(batch, heads, past, head_dim), torch.zeros(batch, heads, past, head_dim), layer)
    positions = torch.arange(past, past + length).expand(batch, -1)
    for layer_idx, used_cache in ((1, cache), (None, None)):
        if used_cache is None and past:
            continue  # without a cache there are no past positions
        got = padded_causal_mask(config, hidden, mask, used_cache, layer_idx)
        expected = _reference(config, hidden, mask, used_cache, positions, layer_idx, False)
        assert got is not None and got.dtype == expected.dtype and torch.equal(got, expected)
    # a 2-D mask shorter than the key length is padded with zeros, as transformers pads it
    short = mask[:, : past + length - 2]
    got = padded_causal_mask(config, hidden, short, cache, 1)
    assert torch.equal(got, _reference(config, hidden, short, cache, positions, 1, False))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_remembered_causal_blocks_are_never_handed_out(implementation):
    """`StageMasks` remembers the causal block per (past, length, device): a second padded build of the same length
    reuses it, and writing into the first result (as a caller may) changes neither the block nor the next mask."""
    config = build_tiny("llava", attn_implementation=implementation).model.language_model.config
    masks = StageMasks(config)
    hidden = torch.randn(2, 5, config.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    positions = torch.arange(5).expand(2, -1)
    expected = _reference(config, hidden, mask, None, positions, None, False)
    first = masks.build(hidden, mask, None, positions, None, False)
    assert torch.equal(first, expected) and len(masks._causal) == 1
    first.fill_(True if implementation == "sdpa" else 0.0)
    second = masks.build(hidden, mask, None, positions, None, False)
    assert torch.equal(second, expected) and len(masks._causal) == 1 and masks._causal.hits == 1
    longer = masks.build(torch.randn(2, 6, config.hidden_size), torch.ones(2, 6, dtype=torch.long), None,
                         torch.arange(6).expand(2, -1), None, False)  # fmt: skip
    assert longer.shape[-1] == 6 and len(masks._causal) == 2


def test_padded_causal_mask_leaves_other_cases_to_transformers():
    config = build_tiny("llava", attn_implementation="sdpa").model.language_model.config
    hidden, mask = torch.zeros(2, 4, config.hidden_size), torch.ones(2, 4, dtype=torch.long)
    assert padded_causal_mask(config, hidden, None, None, None) is None  # nothing to pad
    assert padded_causal_mask(config, hidden, mask, object(), 0) is None  # not a dynamic cache
    config._attn_implementation = "flex_attention"
    assert padded_causal_mask(config, hidden, mask, None, None) is None

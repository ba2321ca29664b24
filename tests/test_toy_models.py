"""The toy models build, run forward and greedy generate, and their inputs are self-consistent."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.toy_models import (
    IMAGE_ID,
    SPECIAL_IDS,
    VIDEO_FAMILIES,
    VIDEO_ID,
    available_families,
    build_tiny,
    make_inputs,
    single_row,
)

FAMILIES = available_families()
torch.set_num_threads(1)  # tiny matrices: threads only add contention
_MODELS: dict = {}


def _model(family: str, attn: str):
    key = (family, attn)
    if key not in _MODELS:
        _MODELS[key] = build_tiny(family, attn_implementation=attn)
    return _MODELS[key]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generate(family, attn, batch):
    model = _model(family, attn)
    videos = [False, True] if family in VIDEO_FAMILIES else [False]
    for video in videos:
        inputs = make_inputs(model, batch=batch, padding="left", video=video)
        if batch > 1:
            lengths = inputs["attention_mask"].sum(-1)
            assert len(set(lengths.tolist())) == batch, "rows must differ in length so padding happens"
        with torch.no_grad():
            out = model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.logits.shape[:2] == inputs["input_ids"].shape
        assert torch.isfinite(out.logits).all()
        new = gen[:, inputs["input_ids"].shape[1]:]
        assert new.shape == (batch, 3)
        assert not torch.isin(new, torch.tensor(SPECIAL_IDS)).any()
        n_vis = ((inputs["input_ids"] == IMAGE_ID) | (inputs["input_ids"] == VIDEO_ID)).sum(-1)
        assert (n_vis > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_single_row_matches_row_alone(family):
    model = _model(family, "sdpa")
    video = family in VIDEO_FAMILIES
    for padding in ("left", "right"):
        inputs = make_inputs(model, batch=2, padding=padding, video=video)
        with torch.no_grad():
            logits = model(**inputs).logits
        for i in range(2):
            alone = single_row(inputs, i)
            direct = make_inputs(model, rows=[i], video=video)
            assert alone.keys() == direct.keys()
            for k in alone:
                assert torch.equal(alone[k], direct[k]), k
            with torch.no_grad():
                got = model(**alone).logits[0]
            keep = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][keep], got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_with_different_image_counts(family):
    model = _model(family, "sdpa")
    inputs = make_inputs(model, batch=3, num_images=[0, 2, 1])
    with torch.no_grad():
        logits = model(**inputs).logits
    for i, n in enumerate([0, 2, 1]):
        alone = single_row(inputs, i)
        direct = make_inputs(model, rows=[i], num_images=[0, 2, 1])
        assert alone.keys() == direct.keys()
        assert ("pixel_values" in alone) == (n > 0)
        for k in alone:
            assert torch.equal(alone[k], direct[k]), k
        with torch.no_grad():
            got = model(**alone).logits[0]
        keep = inputs["attention_mask"][i].bool()
        torch.testing.assert_close(logits[i][keep], got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_and_text_only(family):
    a = build_tiny(family, seed=3)
    b = build_tiny(family, seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    cfg = a.config.text_config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.pad_token_id is not None
    text = make_inputs(a, batch=2, num_images=0)
    assert set(text) <= {"input_ids", "attention_mask", "mm_token_type_ids"}
    with torch.no_grad():
        a(**text)

"""VisionZip (dominant + contextual tokens) and the vision-tower signals recomputed from one layer's input."""

from __future__ import annotations

import pytest
import torch

from vlm_prune.adapters.vision_signals import (
    clip_layer_cls_attention,
    qwen2vl_block_mean_attention,
    siglip_layer_mean_attention,
)
from vlm_prune.engine.context import IMAGE, Selection, SelectionContext, VisualLayout
from vlm_prune.errors import MethodOptionError, PruneError
from vlm_prune.methods.visionzip import (
    VisionZip,
    merge_groups,
    split_budget,
    visionzip_plan,
    visionzip_select,
)

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------------
# The pure selection / merge


def _hand_case():
    """8 tokens; dominant = tokens 2 and 5; the 6 others: targets at local 0 and 3 (stride 6 // 2)."""
    attn = torch.tensor([0.1, 0.0, 0.9, 0.2, 0.0, 0.8, 0.3, 0.1])
    # remaining tokens in order: 0, 1, 3, 4, 6, 7 -> targets are tokens 0 and 4
    keys = torch.tensor(
        [
            [1.0, 0.0],  # 0: target A
            [2.0, 0.1],  # 1 -> A
            [0.0, 0.0],  # 2: dominant
            [0.1, 3.0],  # 3 -> B
            [0.0, 1.0],  # 4: target B
            [0.0, 0.0],  # 5: dominant
            [0.9, 0.2],  # 6 -> A
            [0.2, 0.5],  # 7 -> B
        ]
    )
    features = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    return attn, keys, features


def test_split_budget_keeps_the_paper_proportion():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    assert split_budget(0) == (0, 0)
    assert sum(split_budget(37)) == 37


def test_plan_and_group_means_on_a_hand_built_case():
    attn, keys, features = _hand_case()
    dominant_mask, targets, group = visionzip_plan(attn, keys, dominant=2, contextual=2)
    assert dominant_mask.nonzero().flatten().tolist() == [2, 5]
    assert targets.tolist() == [0, 4]
    assert group.tolist() == [0, 0, -1, 1, 1, -1, 0, 1]
    selection = visionzip_select(attn, keys, features, dominant=2, contextual=2)
    assert isinstance(selection, Selection)
    assert selection.keep_mask.nonzero().flatten().tolist() == [0, 2, 4, 5]
    expected = torch.stack(
        [
            features[[0, 1, 6]].mean(0),  # target A's group
            features[2],
            features[[3, 4, 7]].mean(0),  # target B's group
            features[5],
        ]
    )
    torch.testing.assert_close(selection.features, expected)
    released = merge_groups(features, targets, group, "target_plus_mean")
    torch.testing.assert_close(released[0], features[0] + features[[1, 6]].mean(0))
    torch.testing.assert_close(released[1], features[4] + features[[3, 7]].mean(0))


def test_select_edge_cases():
    attn, keys, features = _hand_case()
    everything = visionzip_select(attn, keys, features, dominant=6, contextual=4)
    assert everything.keep_mask.all() and everything.features is None
    only_dominant = visionzip_select(attn, keys, features, dominant=3, contextual=0)
    assert only_dominant.keep_mask.nonzero().flatten().tolist() == [2, 5, 6]
    torch.testing.assert_close(only_dominant.features, features[[2, 5, 6]])


def _context(attn, keys, features, budgets, media_index, projector=None, projector_inputs=None):
    n = attn.numel()
    layout = VisualLayout(
        media_index=media_index,
        kind=torch.full((n,), IMAGE),
        frame=torch.zeros(n, dtype=torch.long),
        grid_thw=torch.zeros(n, 3, dtype=torch.long),
        media_grid=[(1, 1, int((media_index == i).sum())) for i in range(len(budgets))],
    )
    return SelectionContext(
        layer=0,
        num_visual=n,
        budget=sum(budgets),
        budget_per_media=list(budgets),
        visual_features=features,
        hidden_states=torch.zeros(n + 4, features.shape[1]),
        visual_index=torch.arange(2, n + 2),
        input_ids=torch.zeros(n + 4, dtype=torch.long),
        layout=layout,
        vision_attention=attn,
        vision_keys=keys,
        projector=projector,
        projector_inputs=projector_inputs,
    )


def test_method_counts_are_exact_per_media_item():
    g = torch.Generator().manual_seed(0)
    n1, n2 = 100, 60
    attn = torch.rand(n1 + n2, generator=g)
    keys = torch.randn(n1 + n2, 8, generator=g)
    features = torch.randn(n1 + n2, 16, generator=g)
    media_index = torch.cat([torch.zeros(n1, dtype=torch.long), torch.ones(n2, dtype=torch.long)])
    method = VisionZip()
    assert method.stages()[0].keep == 64 and method.stages()[0].layer == 0
    assert method.stages()[0].needs == frozenset({"vision_attention"})
    result = method.select(_context(attn, keys, features, [64, 20], media_index))
    assert isinstance(result, Selection)
    assert int(result.keep_mask[:n1].sum()) == 64 and int(result.keep_mask[n1:].sum()) == 20
    assert result.features.shape == (84, 16)
    # item 0 alone gives the same tokens and features
    alone = visionzip_select(attn[:n1], keys[:n1], features[:n1], 54, 10)
    assert torch.equal(alone.keep_mask, result.keep_mask[:n1])
    torch.testing.assert_close(alone.features, result.features[:64])
    # item 1 uses the 54:10 split of 20 -> 17 dominant + 3 contextual
    second = visionzip_select(attn[n1:], keys[n1:], features[n1:], *split_budget(20))
    torch.testing.assert_close(second.features, result.features[64:])


def test_projector_input_merge_equals_projected_merge_for_a_linear_projector():
    g = torch.Generator().manual_seed(1)
    n = 40
    attn, keys = torch.rand(n, generator=g), torch.randn(n, 8, generator=g)
    proj = torch.nn.Linear(6, 12)
    inputs = torch.randn(n, 6, generator=g)
    with torch.no_grad():
        features = proj(inputs)
        ctx = _context(attn, keys, features, [16], torch.zeros(n, dtype=torch.long), proj, inputs)
        projected = VisionZip(keep=16).select(ctx)
        through = VisionZip(keep=16, merge_space="projector_input").select(ctx)
    assert VisionZip(merge_space="projector_input").stages()[0].needs == frozenset({"vision_attention", "projector"})
    assert torch.equal(projected.keep_mask, through.keep_mask)
    torch.testing.assert_close(projected.features, through.features, atol=1e-5, rtol=1e-5)


def test_missing_signal_is_a_clear_error():
    attn, keys, features = _hand_case()
    ctx = _context(attn, keys, features, [4], torch.zeros(8, dtype=torch.long))
    ctx.vision_attention = None
    with pytest.raises(PruneError, match="vision_attention"):
        VisionZip(keep=4).select(ctx)


@pytest.mark.parametrize(
    ("options", "message"), [({"merge": "max"}, "merge must be one of"), ({"merge_space": "llm"}, "merge_space")]
)
def test_bad_merge_option_is_a_method_option_error(options, message):
    with pytest.raises(MethodOptionError, match=message):
        VisionZip(**options)


def test_registered():
    from vlm_prune.methods.registry import get_method

    assert isinstance(get_method("visionzip", dominant=108, contextual=20), VisionZip)
    assert VisionZip(dominant=108, contextual=20).stages()[0].keep == 128


# ---------------------------------------------------------------------------------------------------
# Vision signals against eager attention of real (tiny, random) towers


def _capture_input(module):
    captured = {}

    def hook(mod, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = kwargs

    return captured, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_clip_cls_attention_and_keys_match_eager():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(config).eval()
    layer = model.encoder.layers[1]
    captured, handle = _capture_input(layer)
    keys_seen = {}
    key_hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys_seen.setdefault("k", out))
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32), output_attentions=True)
    handle.remove()
    key_hook.remove()
    cls_attn, keys = clip_layer_cls_attention(layer, captured["hidden"])
    expected = out.attentions[1][:, :, 0, 1:].sum(dim=1)
    assert cls_attn.shape == (2, 16)
    torch.testing.assert_close(cls_attn, expected.float(), atol=1e-6, rtol=1e-5)
    raw = keys_seen["k"].view(2, 17, 4, 8).transpose(1, 2)[:, :, 1:].mean(dim=1)
    torch.testing.assert_close(keys, raw, atol=1e-6, rtol=1e-5)


def test_siglip_mean_received_attention_matches_eager():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    model = SiglipVisionModel(config).eval()
    layer = model.encoder.layers[1]
    captured, handle = _capture_input(layer)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32), output_attentions=True)
    handle.remove()
    received, keys = siglip_layer_mean_attention(layer, captured["hidden"], chunk=5)  # chunking exercised
    expected = out.attentions[1].sum(dim=1).mean(dim=1)  # heads summed, mean over queries
    torch.testing.assert_close(received, expected.float(), atol=1e-6, rtol=1e-5)
    assert keys.shape == (2, 16, 8)


def _record_eager(monkeypatch, module):
    """Wrap a modeling module's eager_attention_forward so the probabilities of each call are recorded."""
    calls: list[torch.Tensor] = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        output, weights = original(*args, **kwargs)
        calls.append(weights.detach())
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return calls


def _qwen_pixels(grid: list[tuple[int, int, int]], patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grid)
    patches = int(grid_thw.prod(dim=1).sum())
    return torch.randn(patches, 3 * 2 * patch * patch), grid_thw


def test_qwen2vl_block_mean_attention_matches_eager(monkeypatch):
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=32,
        hidden_size=24,
        num_heads=4,
        mlp_ratio=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config._attn_implementation = "eager"
    model = mq.Qwen2VisionTransformerPretrainedModel(config).eval()
    block = model.blocks[1]
    captured, handle = _capture_input(block)
    calls = _record_eager(monkeypatch, mq)
    pixels, grid_thw = _qwen_pixels([(1, 4, 6), (2, 4, 4)], patch=2)  # an image and a 2-step video
    with torch.no_grad():
        model(pixels, grid_thw=grid_thw)
    handle.remove()
    block_calls = calls[len(calls) // 2 :]  # the second block's chunks
    kwargs = captured["kwargs"]
    received, keys = qwen2vl_block_mean_attention(
        block, captured["hidden"], kwargs["cu_seqlens"], kwargs["position_embeddings"], chunk=3
    )
    per_patch = torch.cat([w[0].sum(dim=0).mean(dim=0) for w in block_calls])  # heads summed, mean over queries
    expected = per_patch.view(-1, 4).mean(dim=1)
    assert received.shape == (int(grid_thw.prod(dim=1).sum()) // 4,)
    torch.testing.assert_close(received, expected.float(), atol=1e-6, rtol=1e-5)
    assert keys.shape == (received.shape[0], 32)
    # without rotary (documented approximation) the numbers change but the shapes do not
    plain, _ = qwen2vl_block_mean_attention(block, captured["hidden"], kwargs["cu_seqlens"], None)
    assert plain.shape == received.shape and not torch.allclose(plain, received)


def test_qwen25vl_window_block_is_put_back_in_merged_order(monkeypatch):
    mq = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.vision_utils import get_vision_window_index

    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        out_hidden_size=24,
        intermediate_size=48,
        num_heads=4,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=8,
        fullatt_block_indexes=[1],
    )
    config._attn_implementation = "eager"
    model = mq.Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    block = model.blocks[0]  # a window-attention block
    captured, handle = _capture_input(block)
    calls = _record_eager(monkeypatch, mq)
    pixels, grid_thw = _qwen_pixels([(1, 8, 12)], patch=2)
    with torch.no_grad():
        model(pixels, grid_thw=grid_thw)
    handle.remove()
    window_index, cu_window = get_vision_window_index(grid_thw, 2, 8, 2)
    kwargs = captured["kwargs"]
    assert torch.equal(kwargs["cu_seqlens"].to(torch.long), torch.as_tensor(cu_window, dtype=torch.long))
    received, _ = qwen2vl_block_mean_attention(
        block, captured["hidden"], kwargs["cu_seqlens"], kwargs["position_embeddings"], window_index=window_index
    )
    windows = len(cu_window) - 1
    per_patch = torch.cat([w[0].sum(dim=0).mean(dim=0) for w in calls[:windows]])  # window order
    expected = per_patch.view(-1, 4).mean(dim=1)[torch.argsort(window_index)]
    torch.testing.assert_close(received, expected.float(), atol=1e-6, rtol=1e-5)

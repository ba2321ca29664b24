"""LLaVA-3D on transformers 5 (issue 12): geometry, model, processor, converter and bad-input errors.

References are hand-built here: the authors' pipeline order (full-resolution back-projection, then a nearest
resize of the xyz map; python dict grouping for the voxels), never the module under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vlm_prune
from vlm_prune.errors import InputError
from vlm_prune.models.llava3d import Llava3DConfig, Llava3DForConditionalGeneration
from vlm_prune.models.llava3d import geometry as G
from vlm_prune.models.llava3d.convert import convert_state_dict, rename_key
from vlm_prune.models.llava3d.convert import main as convert_main
from vlm_prune.models.llava3d.processing import Llava3DProcessor, fit_view
from vlm_prune.models.llava3d.tiny import (
    CLICK_ID,
    build_tiny_llava3d,
    make_scene_inputs,
    random_scene,
    single_scene_row,
    tiny_tokenizer,
)

torch.set_num_threads(1)
_MODEL: dict = {}


def tiny():
    if "m" not in _MODEL:
        _MODEL["m"] = build_tiny_llava3d(4)
    return _MODEL["m"]


# ---------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------

def authors_order_xyz(depth, intrinsics, poses, axis_align, grid):
    """Full-resolution back-projection (integer pixel coordinates) then F.interpolate(nearest) to the grid."""
    views, height, width = depth.shape
    v, u = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    out = []
    for i in range(views):
        k = intrinsics[i] if intrinsics.ndim == 3 else intrinsics
        z = depth[i]
        cam = torch.stack([(u - k[0, 2]) * z / k[0, 0], (v - k[1, 2]) * z / k[1, 1], z, torch.ones_like(z)], -1)
        world = cam.reshape(-1, 4) @ (axis_align @ poses[i]).T
        xyz = (world[:, :3] / world[:, 3:]).reshape(height, width, 3).permute(2, 0, 1)[None]
        out.append(F.interpolate(xyz, size=grid, mode="nearest")[0].permute(1, 2, 0).reshape(-1, 3))
    return torch.stack(out)


def test_backprojection_matches_the_authors_order_and_a_hand_pixel():
    scene = random_scene(3, views=2, size=32, holes=0.0)
    intr = scene["intrinsics"].expand(2, 4, 4)
    xyz, valid = G.backproject_patches(scene["depth"], intr, scene["poses"], scene["axis_align"], (4, 4))
    expected_all = authors_order_xyz(scene["depth"], intr, scene["poses"], scene["axis_align"], (4, 4))
    torch.testing.assert_close(xyz, expected_all)
    assert bool(valid.all())
    # patch (1, 2) of view 1 reads pixel (8, 16): camera ((16 - cx) z / fx, (8 - cy) z / fy, z)
    z = float(scene["depth"][1, 8, 16])
    k = scene["intrinsics"]
    cam = torch.tensor([(16 - k[0, 2]) * z / k[0, 0], (8 - k[1, 2]) * z / k[1, 1], z, 1.0])
    expected = (scene["axis_align"] @ scene["poses"][1] @ cam)[:3]
    torch.testing.assert_close(xyz[1, 1 * 4 + 2], expected)


def test_voxels_are_lexicographic_and_features_are_group_means():
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(200, 3, generator=g) * 2 - 1
    features = torch.randn(200, 5, generator=g)
    inverse, ijk, origin = G.voxelize(xyz, 0.4)
    groups: dict[tuple, list[int]] = {}
    for n, point in enumerate(xyz):
        key = tuple(int(torch.round(c / 0.4)) for c in point)
        groups.setdefault(key, []).append(n)
    keys = sorted(groups)
    assert [tuple((row + origin).tolist()) for row in ijk] == keys
    means = G.scatter_mean(features, inverse, len(ijk))
    for index, key in enumerate(keys):
        torch.testing.assert_close(means[index], features[groups[key]].mean(0))


def test_cap_is_seeded_sorted_and_a_subset():
    kept = G.cap_voxels(100, 10, seed=3)
    assert len(kept) == 10 and bool((kept[1:] > kept[:-1]).all()) and int(kept.max()) < 100
    assert torch.equal(kept, G.cap_voxels(100, 10, seed=3))
    assert not torch.equal(kept, G.cap_voxels(100, 10, seed=4))
    assert torch.equal(G.cap_voxels(7, 10, seed=3), torch.arange(7))
    scene = random_scene(1, views=3)
    full = G.scene_geometry(scene["depth"], scene["intrinsics"], scene["poses"], scene["axis_align"], (4, 4))
    capped = G.scene_geometry(
        scene["depth"], scene["intrinsics"], scene["poses"], scene["axis_align"], (4, 4), max_voxels=5, seed=3
    )
    assert len(capped) == 5 and capped.num_voxels == full.num_voxels == len(full) > 5
    picked = G.cap_voxels(len(full), 5, seed=3)
    assert torch.equal(capped.voxel_ijk, full.voxel_ijk[picked])
    assert int((capped.patch_voxel >= 0).sum()) < len(capped.patch_voxel)  # patches of dropped voxels


def test_invalid_depth_patches_are_dropped():
    scene = random_scene(2, views=2, holes=0.0)
    depth = scene["depth"].clone()
    depth[0] = 0.0
    geometry = G.scene_geometry(depth, scene["intrinsics"], scene["poses"], scene["axis_align"], (4, 4))
    assert bool((geometry.patch_index >= 16).all()) and len(geometry.patch_index) == 16


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def hand_built_embeds(model, inputs, row):
    """The LLM input of one row, from the model's parts and python grouping (no scatter, no masked_scatter)."""
    inner = model.model
    pixel = inputs["pixel_values"][row]
    hidden = inner.vision_tower(pixel, output_hidden_states=True).hidden_states[-2][:, 1:]
    side = int(math.isqrt(hidden.shape[1]))
    xyz = authors_order_xyz(
        inputs["depths"][row], inputs["intrinsics"][row], inputs["poses"][row], inputs["axis_align"][row], (side, side)
    ).reshape(-1, 3)
    depth_at = inputs["depths"][row][:, :: pixel.shape[-1] // side, :: pixel.shape[-1] // side].reshape(-1)
    patches = hidden.reshape(-1, hidden.shape[-1]) + inner.position_embedding(xyz)
    groups: dict[tuple, list[int]] = {}
    for n in range(len(xyz)):
        if depth_at[n] > 0:
            groups.setdefault(tuple(int(torch.round(c / model.config.voxel_size)) for c in xyz[n]), []).append(n)
    voxels = torch.stack([patches[groups[key]].mean(0) for key in sorted(groups)])
    tokens = inner.multi_modal_projector(voxels)
    ids = inputs["input_ids"][row]
    embeds = inner.get_input_embeddings()(ids).clone()
    embeds[ids == model.config.image_token_id] = tokens
    if "clicks" in inputs:
        embeds[ids == CLICK_ID] = inner.prompt_encoder(inputs["clicks"][row][:1])
    return embeds


def lm_input(model, inputs):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    return seen[0], out


def test_3d_forward_equals_the_hand_built_pipeline_and_rows_alone():
    model = tiny()
    inputs = make_scene_inputs(model, batch=2, padding="left", clicks=True)
    embeds, out = lm_input(model, inputs)
    for row in range(2):
        valid = inputs["attention_mask"][row].bool()
        torch.testing.assert_close(embeds[row][valid], hand_built_embeds(model, single_scene_row(inputs, row), 0))
        with torch.no_grad():
            alone = model(**single_scene_row(inputs, row)).logits[0]
        torch.testing.assert_close(out.logits[row][valid], alone, atol=2e-5, rtol=1e-4)


def test_2d_mode_zeroes_the_position_embedding():
    model = tiny()
    pixel = make_scene_inputs(model, batch=1)["pixel_values"][:, 0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    ids = torch.tensor([[1, 20, *([model.config.image_token_id] * side * side), 21]])
    embeds, _ = lm_input(model, {"input_ids": ids, "pixel_values": pixel})
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel, output_hidden_states=True).hidden_states[-2][0, 1:]
        expected = model.model.multi_modal_projector(hidden)
    torch.testing.assert_close(embeds[0, 2 : 2 + side * side], expected)


def test_auto_classes_load_a_saved_model(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = tiny()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llava3d"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, Llava3DForConditionalGeneration)
    inputs = make_scene_inputs(model, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert vlm_prune.apply(loaded, "random", keep=0.5).adapter.family == "llava3d"


# ---------------------------------------------------------------------------------------------------------
# processor
# ---------------------------------------------------------------------------------------------------------

def processor():
    return Llava3DProcessor.for_model(tiny().config, tiny_tokenizer())


def test_processor_emits_one_placeholder_per_voxel_and_the_model_agrees():
    model, proc = tiny(), processor()
    scenes = [random_scene(5, views=3), random_scene(6, views=2)]  # different view counts: padded
    content = [{"type": "scene"}, {"type": "text", "text": "how many spheres ?"}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}])
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    inputs = proc(
        [prompt, prompt], rgb=[s["rgb"] for s in scenes], depth=[s["depth"] for s in scenes],
        intrinsics=[s["intrinsics"] for s in scenes], poses=[s["poses"] for s in scenes],
        axis_align=[s["axis_align"] for s in scenes],
    )
    assert inputs["pixel_values"].shape[:2] == (2, 3) and bool((inputs["depths"][1, 2] == 0).all())
    with torch.no_grad():
        encoded = model.get_image_features(
            inputs["pixel_values"], inputs["depths"], inputs["intrinsics"], inputs["poses"], inputs["axis_align"]
        )
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts == [len(t) for t in encoded.pooler_output] and counts[0] != counts[1]
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_processor_fits_non_square_views_and_moves_the_principal_point():
    rgb = torch.randint(0, 255, (1, 40, 64, 3), dtype=torch.uint8)
    depth = torch.arange(40 * 64, dtype=torch.float32).reshape(1, 40, 64) + 1
    k = torch.eye(4)[None].clone()
    k[0, 0, 0], k[0, 1, 1], k[0, 0, 2], k[0, 1, 2] = 50.0, 50.0, 32.0, 20.0
    image, fitted, k2 = fit_view(rgb, depth, k, 32)
    assert image.shape == (1, 3, 32, 32) and fitted.shape == (1, 32, 32)
    # short side 40 -> 32 (scale 0.8), long 64 -> 51, crop left round(19 / 2) = 10
    assert k2[0, 0, 0] == pytest.approx(50 * 51 / 64) and k2[0, 1, 1] == pytest.approx(50 * 0.8)
    assert k2[0, 0, 2] == pytest.approx(32 * 51 / 64 - 10) and k2[0, 1, 2] == pytest.approx(20 * 0.8)
    # nearest-exact: output pixel (r, c) of the resized map reads source (floor((r+.5)/0.8), floor((c+10+.5)*64/51))
    r, c = 7, 5
    src = depth[0, int((r + 0.5) / 0.8), int((c + 10 + 0.5) * 64 / 51)]
    assert float(fitted[0, r, c]) == float(src)


# ---------------------------------------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------------------------------------

def authors_names(state: dict) -> dict:
    """Our tiny state dict under the released checkpoint's names (written out by hand, not via the converter)."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            new = "model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            new = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key.startswith("model.multi_modal_projector.linear_1."):
            new = "model.mm_projector.0." + key.rsplit(".", 1)[1]
        elif key.startswith("model.multi_modal_projector.linear_2."):
            new = "model.mm_projector.2." + key.rsplit(".", 1)[1]
        elif key.startswith("model.position_embedding.head."):
            new = "model.video_tower.video_tower.positional_embedding.position_embedding_head." + key[30:]
        elif key.startswith("model.prompt_encoder.head."):
            new = "model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head." + key[26:]
        else:
            new = key
        out[new] = value
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


def write_source(folder, model, tokenizer=True):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    folder.mkdir()
    text = model.config.text_config
    source = {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_video_tower": "SpatialAwareModule",
        **{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "pad_token_id",
                                        "bos_token_id", "eos_token_id", "max_position_embeddings")},
    }
    (folder / "config.json").write_text(json.dumps(source))
    state = {k: v.contiguous() for k, v in authors_names(model.state_dict()).items()}
    save_file(state, str(folder / "model.safetensors"))
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    clip = folder.parent / f"{folder.name}_clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps(CLIPVisionConfig(**model.config.vision_config.to_dict()).to_dict()))
    return clip


def test_converter_on_the_released_key_layout(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    model = tiny()
    clip = write_source(tmp_path / "src", model)
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out"), "--clip", str(clip)]) == 0
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert loaded.config.image_token_id == 3 and loaded.config.click_token_id == CLICK_ID
    inputs = make_scene_inputs(model, batch=2, clicks=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    proc = Llava3DProcessor.from_pretrained(tmp_path / "out")
    assert proc.image_token_id == 3 and proc.max_voxels == model.config.max_voxels
    assert "dropped 1 keys" in capsys.readouterr().err


def test_converter_adds_the_placeholders_when_the_vocabulary_lacks_them(tmp_path):
    model = tiny()
    clip = write_source(tmp_path / "src", model, tokenizer=False)
    convert_main([str(tmp_path / "src"), str(tmp_path / "out"), "--clip", str(clip)])
    config = Llava3DConfig.from_pretrained(tmp_path / "out")
    vocab = model.config.text_config.vocab_size
    ids = (config.image_token_id, config.click_token_id, config.text_config.vocab_size)
    assert ids == (vocab, vocab + 1, vocab + 2)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    embed = weights["model.language_model.embed_tokens.weight"]
    torch.testing.assert_close(embed[vocab], model.model.language_model.embed_tokens.weight.mean(0).detach())


def test_converter_names_and_unknown_keys():
    assert rename_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert rename_key("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert rename_key("model.image_newline") is None
    with pytest.raises(InputError, match="not in the LLaVA-3D layout"):
        convert_state_dict({"model.foo.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------
# bad input (deliverable 6)
# ---------------------------------------------------------------------------------------------------------

def scene_call(**change):
    scene = random_scene(9, views=2)
    args = dict(rgb=scene["rgb"], depth=scene["depth"], intrinsics=scene["intrinsics"], poses=scene["poses"],
                axis_align=scene["axis_align"])
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(depth=torch.ones(2, 16, 32)), "RGB views .* and the depth maps .* disagree"),
        (dict(depth=torch.ones(3, 32, 32)), "disagree"),
        (dict(poses=torch.eye(3).expand(2, 3, 3)), "pose must be a 4x4 matrix"),
        (dict(poses=torch.eye(4).expand(3, 4, 4)), "one 4x4 matrix per view"),
        (dict(intrinsics=torch.eye(3)), "pad a 3x3 intrinsics to 4x4"),
        (dict(axis_align=torch.eye(3)), "axis_align must be one 4x4 matrix"),
        (dict(depth=torch.zeros(2, 32, 32)), "no valid depth"),
    ],
)
def test_bad_scenes_raise_clear_errors(change, match):
    proc = processor()
    with pytest.raises(InputError, match=match):
        proc("USER: <image>\nwhat ? ASSISTANT:", **scene_call(**change))


def test_voxel_cap_below_one_is_refused_everywhere():
    with pytest.raises(InputError, match="at least 1"):
        Llava3DConfig(max_voxels=0)
    with pytest.raises(InputError, match="at least 1"):
        Llava3DProcessor(tiny_tokenizer(), image_size=32, patch_size=8, max_voxels=0)
    with pytest.raises(InputError, match="at least 1"):
        G.cap_voxels(10, 0, seed=0)


def test_a_prompt_without_the_scene_placeholder_is_refused():
    proc = processor()
    with pytest.raises(InputError, match="exactly one '<image>' scene placeholder"):
        proc("USER: what colour is the box ? ASSISTANT:", **scene_call())
    model = tiny()
    inputs = make_scene_inputs(model, batch=1)
    inputs["input_ids"] = inputs["input_ids"][:, :5]
    inputs["attention_mask"] = inputs["attention_mask"][:, :5]
    inputs["input_ids"][inputs["input_ids"] == model.config.image_token_id] = 20
    with pytest.raises(InputError, match="0 scene/image placeholders"):
        with torch.no_grad():
            model(**inputs)


def test_converter_takes_the_vision_tower_from_clip_when_the_checkpoint_lacks_it(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    model = tiny()
    clip = write_source(tmp_path / "src", model)
    weights = load_file(str(tmp_path / "src" / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    tower = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}  # CLIP's own "vision_model.*"
    rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    save_file(rest, str(tmp_path / "src" / "model.safetensors"))
    text_key = "text_model.embeddings.token_embedding.weight"  # a full CLIP folder: the text half is skipped
    save_file({**tower, text_key: torch.zeros(2, 2)}, str(clip / "model.safetensors"))
    convert_main([str(tmp_path / "src"), str(tmp_path / "out"), "--clip", str(clip)])
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    inputs = make_scene_inputs(model, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    (clip / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no \\*.safetensors"):
        convert_main([str(tmp_path / "src"), str(tmp_path / "out2"), "--clip", str(clip)])



@pytest.mark.parametrize("with_clicks", [False, True])
def test_generated_click_token_is_plain_text(with_clicks):
    """A click token the model GENERATES is a text token (clicks describe only the prompt's placeholders): a head
    biased to emit it decodes without error, and the decode logits equal the language model's over the prompt's
    spliced embeddings followed by the generated ids' plain embeddings."""
    model = build_tiny_llava3d(4)
    bias = 100.0 * F.one_hot(torch.tensor(CLICK_ID), model.config.text_config.vocab_size).float()
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    inputs = make_scene_inputs(model, batch=1, clicks=with_clicks)
    assert int((inputs["input_ids"] == CLICK_ID).sum()) == (1 if with_clicks else 0)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        assert out.sequences[0, length:].tolist() == [CLICK_ID] * 3
        prompt_embeds = model(**inputs, output_hidden_states=True).hidden_states[0]  # media and clicks spliced
        grown = torch.cat([prompt_embeds, model.get_input_embeddings()(out.sequences[:, length : length + 2])], 1)
        mask = torch.ones(grown.shape[:2], dtype=torch.long)
        hidden = model.model.language_model(inputs_embeds=grown, attention_mask=mask).last_hidden_state
        reference = model.lm_head(hidden[:, -3:])
    for step in range(3):
        torch.testing.assert_close(out.scores[step], reference[:, step], atol=1e-4, rtol=1e-4)

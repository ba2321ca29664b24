"""The LISA-style segmenter on tiny random parts, LISA's checkpoint converter, gIoU / cIoU and the mosaic task."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference import TINY_SAM_CONFIG
from vlm_prune.models.segmenter import Segmenter, SegmenterConfig, SegTokenError, seg_token_id
from vlm_prune.models.segmenter_convert import convert_lisa_checkpoint, lisa_to_ours, ours_to_lisa
from vlm_prune.tasks.segmentation import giou_ciou, mask_iou
from vlm_prune.toy_models import build_tiny, make_inputs

torch.set_num_threads(1)
SEG_ID = 7  # unused by the toy vocabularies (special ids 0..6, text from 10)
SAM_FIELDS = TINY_SAM_CONFIG


def tiny_sam():
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    return SamModel(SamConfig(**SAM_FIELDS)).eval()


def tiny_segmenter(family: str = "llava", offset: int = -1) -> Segmenter:
    model = Segmenter(build_tiny(family), tiny_sam(), SegmenterConfig(seg_token_id=SEG_ID, seg_hidden_offset=offset))
    torch.manual_seed(1)
    for parameter in model.text_hidden_fcs.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


def with_answer(inputs: dict, answer: list[int]) -> dict:
    """The toy inputs with the answer tokens appended (teacher forcing), left padding kept."""
    out = dict(inputs)
    batch = inputs["input_ids"].shape[0]
    tail = torch.tensor(answer).expand(batch, -1)
    out["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    return out


def split(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return inputs["input_ids"], inputs["attention_mask"], media


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("offset", [-1, 0])
def test_seg_hidden_equals_unwrapped_model_and_keep_all_pruning(family, offset):
    segmenter = tiny_segmenter(family, offset)
    inputs = with_answer(make_inputs(segmenter.vlm, batch=2, padding="left"), [SEG_ID, 11])
    ids, mask, media = split(inputs)
    sam_pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = segmenter.vlm(input_ids=ids, attention_mask=mask, output_hidden_states=True, **media).hidden_states[-1]
        plain = segmenter(ids, sam_pixels, attention_mask=mask, **media)
        segmenter.apply_pruning("random", keep=1.0)
        kept_all = segmenter(ids, sam_pixels, attention_mask=mask, **media)
        segmenter.apply_pruning("random", keep=0.5)
        pruned = segmenter(ids, sam_pixels, attention_mask=mask, **media)
        kept = segmenter.handle.last_kept_index
        vlm_out = segmenter.vlm(input_ids=ids, attention_mask=mask, output_hidden_states=True, **media)
        pruned_hidden = vlm_out.hidden_states[-1]
        segmenter.remove_pruning()
    seg_column = ids.shape[1] - 2
    for row in range(2):
        expected = hidden[row, seg_column + offset]
        torch.testing.assert_close(plain.seg_hidden[row][0], expected)
        torch.testing.assert_close(kept_all.seg_hidden[row][0], expected, rtol=1e-5, atol=1e-5)
        slot = -2 - (offset == -1)  # text after the image stays at the end of each row
        assert int(kept[row, slot]) == seg_column + offset
        torch.testing.assert_close(pruned.seg_hidden[row][0], pruned_hidden[row, slot])
    assert pruned.mask_logits[0].shape == (1, 64, 64)


def test_masks_come_from_sams_decoder_with_the_seg_prompt():
    """Two [SEG] tokens -> two masks, each SAM's decoder output for that token's projected hidden state."""
    segmenter = tiny_segmenter()
    inputs = with_answer(make_inputs(segmenter.vlm), [SEG_ID, 11, SEG_ID])
    ids, mask, media = split(inputs)
    sam_pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = segmenter(ids, sam_pixels, attention_mask=mask, **media)
        sam = segmenter.sam
        embeddings = sam.get_image_embeddings(sam_pixels)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 8, 8)
        for index in range(2):
            prompt = segmenter.text_hidden_fcs(out.seg_hidden[0][index])
            low, _ = sam.mask_decoder(embeddings, sam.get_image_wide_positional_embeddings(), prompt.view(1, 1, 1, -1),
                                      dense, multimask_output=False)  # fmt: skip
            expected = torch.nn.functional.interpolate(low[0], size=(64, 64), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out.mask_logits[0][index], expected[0, 0])
    assert out.mask_logits[0].shape == (2, 64, 64)
    assert not torch.equal(out.mask_logits[0][0], out.mask_logits[0][1])


def test_lvlm_csp_prunes_by_the_seg_query():
    segmenter = tiny_segmenter()
    inputs = with_answer(make_inputs(segmenter.vlm), [SEG_ID, 11])
    ids, mask, media = split(inputs)
    handle = segmenter.apply_pruning("lvlm_csp", keep=0.25)
    assert next(m for m in handle.methods).query_token_id == SEG_ID
    with torch.no_grad():
        masks = segmenter.predict_masks(ids, torch.randn(1, 3, 64, 64), attention_mask=mask, **media)
    assert masks[0].shape == (1, 64, 64) and masks[0].dtype == torch.bool
    assert handle.stats.image_token_flops_reduction > 0
    segmenter.remove_pruning()


def test_bad_input_errors():
    segmenter = tiny_segmenter()
    inputs = make_inputs(segmenter.vlm)
    with pytest.raises(SegTokenError, match="append the answer"):
        segmenter(inputs["input_ids"], torch.randn(1, 3, 64, 64), attention_mask=inputs["attention_mask"])
    with pytest.raises(SegTokenError, match="outside the VLM's vocabulary"):
        Segmenter(build_tiny("llava"), tiny_sam(), SegmenterConfig(seg_token_id=10_000))

    class Tokenizer:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(SegTokenError, match="add_tokens"):
        seg_token_id(Tokenizer())


def test_save_and_load_round_trip(tmp_path):
    segmenter = tiny_segmenter()
    inputs = with_answer(make_inputs(segmenter.vlm), [SEG_ID, 11])
    ids, mask, media = split(inputs)
    sam_pixels = torch.randn(1, 3, 64, 64)
    segmenter.save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path)
    with torch.no_grad():
        before = segmenter(ids, sam_pixels, attention_mask=mask, **media).mask_logits[0]
        after = loaded(ids, sam_pixels, attention_mask=mask, **media).mask_logits[0]
    torch.testing.assert_close(after, before)
    assert loaded.config == segmenter.config


def test_auto_classes_load_a_saved_segmenter(tmp_path):
    """AutoConfig / AutoModel.from_pretrained(folder) give the Segmenter back, without trust_remote_code, through
    transformers' registries (no transformers class is touched: a stock model folder still loads its own class)."""
    from transformers import AutoConfig, AutoModel

    from vlm_prune.models.segmenter_auto import SegmenterAutoConfig

    segmenter = tiny_segmenter()
    segmenter.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, SegmenterAutoConfig) and config.seg_token_id == SEG_ID
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert isinstance(loaded, Segmenter) and loaded.config == segmenter.config
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    sam_pixels = torch.randn(1, 3, 64, 64)
    ids, mask, media = split(with_answer(make_inputs(segmenter.vlm), [SEG_ID, 11]))
    with torch.no_grad():
        expected = segmenter(ids, sam_pixels, attention_mask=mask, **media).mask_logits[0]
        got = AutoModel.from_pretrained(tmp_path)(ids, sam_pixels, attention_mask=mask, **media).mask_logits[0]
    torch.testing.assert_close(got, expected)
    assert type(AutoModel.from_pretrained(tmp_path / "vlm")) is not Segmenter
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "vlm"), type(segmenter.vlm.config))


def test_batched_mask_decoding_equals_one_row_at_a_time():
    segmenter = tiny_segmenter()
    torch.manual_seed(3)
    pixels, prompts = torch.randn(3, 3, 64, 64), [torch.randn(2, 32) for _ in range(3)]
    with torch.no_grad():
        batched = segmenter.decode_masks(pixels, prompts)
        alone = [segmenter.decode_masks(pixels[i : i + 1], [prompts[i]])[0] for i in range(3)]
        ragged = segmenter.decode_masks(pixels, [prompts[0], prompts[1][:1], prompts[2]])
    for row in range(3):
        torch.testing.assert_close(batched[row], alone[row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ragged[1], alone[1][:1], rtol=1e-5, atol=1e-5)


def test_generate_and_segment_returns_text_masks_and_stats():
    segmenter = tiny_segmenter()
    inputs = make_inputs(segmenter.vlm)
    with torch.no_grad():
        segmenter.vlm.lm_head.weight[SEG_ID] = 50.0 * segmenter.vlm.lm_head.weight[20]  # make it say [SEG]
        segmenter.vlm.lm_head.weight[SEG_ID] += 50.0
    segmenter.apply_pruning("random", keep=0.5)
    out = segmenter.generate_and_segment(inputs, torch.randn(1, 3, 64, 64), max_new_tokens=3)
    assert SEG_ID in out["sequences"][0, inputs["input_ids"].shape[1] :].tolist()
    assert out["masks"][0].shape[1:] == (64, 64) and out["masks"][0].shape[0] >= 1
    assert out["stats"].visual_tokens_out < out["stats"].visual_tokens_in


# ------------------------------------------------------------------------------------------ LISA's layout
def lisa_key_table(text_layers: int, vision_layers: int, sam_layers: int, decoder_layers: int) -> dict[str, str]:
    """LISA-7B-v1's key names (model/LISA.py + LLaVA v1 + segment-anything), each paired BY HAND with ours."""
    table = {"model.embed_tokens.weight": "vlm.model.language_model.embed_tokens.weight",
             "model.norm.weight": "vlm.model.language_model.norm.weight", "lm_head.weight": "vlm.lm_head.weight",
             "model.mm_projector.weight": "vlm.model.multi_modal_projector.linear_1.weight",
             "model.mm_projector.bias": "vlm.model.multi_modal_projector.linear_1.bias"}  # fmt: skip
    for i in range(text_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):  # fmt: skip
            table[f"model.layers.{i}.{name}.weight"] = f"vlm.model.language_model.layers.{i}.{name}.weight"
    clip = "model.vision_tower.vision_tower.vision_model."
    names = ["embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"]
    names += [f"{n}.{p}" for n in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")]
    for i in range(vision_layers):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                  "layer_norm2", "mlp.fc1", "mlp.fc2"):  # fmt: skip
            names += [f"encoder.layers.{i}.{n}.weight", f"encoder.layers.{i}.{n}.bias"]
    table.update({clip + n: "vlm.model.vision_tower." + n for n in names})
    sam = {"image_encoder.pos_embed": "vision_encoder.pos_embed"}
    wb = ("weight", "bias")
    for p in wb:
        sam[f"image_encoder.patch_embed.proj.{p}"] = f"vision_encoder.patch_embed.projection.{p}"
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "attn.qkv"),
                     ("attn.proj", "attn.proj"), ("mlp.lin1", "mlp.lin1"), ("mlp.lin2", "mlp.lin2")):  # fmt: skip
            for i in range(sam_layers):
                sam[f"image_encoder.blocks.{i}.{a}.{p}"] = f"vision_encoder.layers.{i}.{b}.{p}"
        for a, b in (("1", "layer_norm1"), ("3", "layer_norm2")):
            sam[f"image_encoder.neck.{a}.{p}"] = f"vision_encoder.neck.{b}.{p}"
        for a, b in (("0", "conv1"), ("1", "layer_norm1"), ("3", "conv2"), ("4", "layer_norm2"), ("6", "conv3")):
            sam[f"prompt_encoder.mask_downscaling.{a}.{p}"] = f"prompt_encoder.mask_embed.{b}.{p}"
        for a, b in (("0", "upscale_conv1"), ("1", "upscale_layer_norm"), ("3", "upscale_conv2")):
            sam[f"mask_decoder.output_upscaling.{a}.{p}"] = f"mask_decoder.{b}.{p}"
        for i in range(decoder_layers):
            for block in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    key = f"mask_decoder.transformer.layers.{i}.{block}.{proj}.{p}"
                    sam[key] = key
            for n in range(1, 5):
                sam[f"mask_decoder.transformer.layers.{i}.norm{n}.{p}"] = (
                    f"mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}"
                )
            for lin in ("lin1", "lin2"):
                sam[f"mask_decoder.transformer.layers.{i}.mlp.{lin}.{p}"] = (
                    f"mask_decoder.transformer.layers.{i}.mlp.{lin}.{p}"
                )
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}"
            sam[key] = key
        sam[f"mask_decoder.transformer.norm_final_attn.{p}"] = f"mask_decoder.transformer.layer_norm_final_attn.{p}"
        for head in [f"output_hypernetworks_mlps.{i}" for i in range(4)] + ["iou_prediction_head"]:
            for a, b in (("layers.0", "proj_in"), ("layers.1", "layers.0"), ("layers.2", "proj_out")):
                sam[f"mask_decoder.{head}.{a}.{p}"] = f"mask_decoder.{head}.{b}.{p}"
    for a in ("neck.0", "neck.2"):
        sam[f"image_encoder.{a}.weight"] = f"vision_encoder.neck.conv{1 if a == 'neck.0' else 2}.weight"
    for i in range(sam_layers):
        for r in ("rel_pos_h", "rel_pos_w"):
            sam[f"image_encoder.blocks.{i}.attn.{r}"] = f"vision_encoder.layers.{i}.attn.{r}"
    sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = (
        "prompt_encoder.shared_embedding.positional_embedding"
    )
    for i in range(4):
        sam[f"prompt_encoder.point_embeddings.{i}.weight"] = f"prompt_encoder.point_embed.{i}.weight"
    for n in ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight",
              "mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"):  # fmt: skip
        sam[n] = n
    table.update({"model.visual_model." + k: "sam." + v for k, v in sam.items()})
    for a, b in (("0", "0"), ("2", "2")):
        for p in wb:
            table[f"model.text_hidden_fcs.0.{a}.{p}"] = f"text_hidden_fcs.{b}.{p}"
    return table


def linear_projector_segmenter() -> Segmenter:
    from transformers import LlavaForConditionalGeneration

    config = build_tiny("llava").config
    config.projector_hidden_act = "linear"
    torch.manual_seed(0)
    return Segmenter(LlavaForConditionalGeneration(config).eval(), tiny_sam(), SegmenterConfig(seg_token_id=SEG_ID))


def synthetic_lisa_state(segmenter: Segmenter) -> tuple[dict, dict]:
    table = lisa_key_table(4, 2, 2, 2)
    shapes = {k: v.shape for k, v in segmenter.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {lisa: torch.randn(shapes[ours], generator=generator) for lisa, ours in table.items()}
    return state, table


def test_lisa_converter_maps_every_key_and_round_trips():
    segmenter = linear_projector_segmenter()
    state, table = synthetic_lisa_state(segmenter)
    covered = set(table.values()) | {"sam.shared_image_embedding.positional_embedding",
                                     "vlm.model.multi_modal_projector.linear_2.weight",
                                     "vlm.model.multi_modal_projector.linear_2.bias"}  # fmt: skip
    assert covered == set(segmenter.state_dict()), "the hand-written LISA table covers the whole segmenter"
    ours = lisa_to_ours(state)
    for lisa, key in table.items():
        assert torch.equal(ours[key], state[lisa]), (lisa, key)
    assert torch.equal(ours["vlm.model.multi_modal_projector.linear_2.weight"], torch.eye(64))
    segmenter.load_state_dict(ours, strict=True)
    back = ours_to_lisa(segmenter.state_dict())
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_convert_lisa_checkpoint_directory(tmp_path):
    """A LISA directory (config.json with a tiny config, pytorch_model.bin, added_tokens.json) -> from_pretrained."""
    reference = linear_projector_segmenter()
    state, _ = synthetic_lisa_state(reference)
    lisa_dir, out_dir = tmp_path / "lisa", tmp_path / "ours"
    lisa_dir.mkdir()
    torch.save(state, lisa_dir / "pytorch_model.bin")
    text = reference.vlm.config.text_config
    vision = reference.vlm.config.vision_config
    config = {k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads")}  # fmt: skip
    config["vision_config"] = {k: getattr(vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "image_size", "patch_size", "projection_dim")}  # fmt: skip
    config["sam_config"] = SAM_FIELDS
    (lisa_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SegTokenError, match="seg-token-id"):
        convert_lisa_checkpoint(lisa_dir, out_dir, image_token_id=3)
    (lisa_dir / "added_tokens.json").write_text(json.dumps({"[SEG]": SEG_ID, "<im_patch>": 3}))
    convert_lisa_checkpoint(lisa_dir, out_dir)
    loaded = Segmenter.from_pretrained(out_dir)
    assert loaded.config.seg_token_id == SEG_ID and loaded.config.seg_hidden_offset == -1
    converted = ours_to_lisa(loaded.state_dict())
    for key in state:
        assert torch.equal(converted[key], state[key]), key
    inputs = with_answer(make_inputs(loaded.vlm), [SEG_ID, 11])
    ids, mask, media = split(inputs)
    assert loaded.predict_masks(ids, torch.randn(1, 3, 64, 64), attention_mask=mask, **media)[0].shape == (1, 64, 64)


# ------------------------------------------------------------------------------------------ metrics and task
def test_giou_and_ciou_against_hand_computed_masks():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:2, :3] = True  # 6 pixels, 4 shared -> IoU 4/6
    c = torch.zeros(4, 4, dtype=torch.bool)
    c[3, 3] = True  # disjoint from a: IoU 0
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert mask_iou(a, b) == pytest.approx(4 / 6)
    assert mask_iou(empty, empty) == 1.0
    scores = giou_ciou([a, a, empty], [b, c, empty])
    assert scores["giou"] == pytest.approx((4 / 6 + 0 + 1) / 3)
    assert scores["ciou"] == pytest.approx((4 + 0 + 0) / (6 + 5 + 0))


def test_segmentation_samples_masks_and_prompts():
    pytest.importorskip("easy_vqa")
    from vlm_prune.tasks.segmentation import KINDS, make_samples, shape_mask

    samples = make_samples("test", 8, seed=3, grid=2)
    assert [s.kind for s in samples] == list(KINDS) * 2
    assert make_samples("test", 4, seed=3, grid=2)[2].prompt == samples[2].prompt  # deterministic prefix
    for sample in samples:
        row, col = divmod(sample.target, 2)
        cell = sample.mask[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
        assert torch.equal(cell, torch.from_numpy(shape_mask(sample.cells[sample.target])))
        assert int(sample.mask.sum()) == int(cell.sum()) > 0  # nothing outside the target cell
        target = sample.cells[sample.target]
        if sample.kind == "referring_name":
            assert sample.prompt == f"segment the {target.color} {target.shape}"
        if sample.kind == "odd_one_out":
            others = [c.shape for i, c in enumerate(sample.cells) if i != sample.target]
            assert len(set(others)) == 1 and target.shape != others[0]
        if sample.kind == "same_color":
            anchor = sample.prompt.rsplit(" ", 1)[-1]
            (anchor_cell,) = [c for c in sample.cells if c.shape == anchor]
            assert target.color == anchor_cell.color and target is not anchor_cell
    train = make_samples("train", 4, grid=2)
    assert all(c.split == "train" for s in train for c in s.cells)


def test_bench_segmentation_on_a_saved_segmenter(tmp_path):
    """bench --task segmentation: gIoU is the mean per-sample IoU of the teacher-forced masks, cIoU pooled."""
    pytest.importorskip("easy_vqa")
    from vlm_prune.bench import run_bench
    from vlm_prune.demo import demo_model
    from vlm_prune.models.segmenter import add_seg_token
    from vlm_prune.tasks.segmentation import make_samples, sam_pixel_values, teacher_forced_inputs

    vlm, processor = demo_model("llava")
    seg_id = add_seg_token(vlm, processor)
    segmenter = Segmenter(vlm, tiny_sam(), SegmenterConfig(seg_token_id=seg_id))
    segmenter.save_pretrained(tmp_path / "seg", processor=processor)
    result = run_bench(str(tmp_path / "seg"), task="segmentation", methods=["random", "lvlm_csp"], keeps=[1.0, 0.25],
                       n_samples=4, repeats=1, warmup=0, decode_tokens=1, progress=False)  # fmt: skip
    reference = result["reference"]
    loaded = Segmenter.from_pretrained(tmp_path / "seg")
    samples = make_samples("test", 4, seed=0)
    inputs = dict(teacher_forced_inputs(loaded.vlm, processor, samples))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    with torch.no_grad():
        masks = loaded.predict_masks(ids, sam_pixel_values([s.image for s in samples], 64), attention_mask=mask,
                                     output_size=(128, 128), **inputs)  # fmt: skip
    expected = giou_ciou([m[0] for m in masks], [s.mask for s in samples])
    single = loaded.segment(samples[0].image, samples[0].prompt)  # the processor saved beside the VLM
    assert single["masks"].shape == (1, 128, 128) and single["text"] == "[SEG]." and single["stats"] is None
    assert (single["masks"] == masks[0]).float().mean() > 0.99  # alone vs left-padded in a batch of 4
    assert reference["accuracy"] == pytest.approx(expected["giou"])
    assert reference["ciou"] == pytest.approx(expected["ciou"])
    rows = {(r["method"], r["keep"]): r for r in result["results"]}
    csp = rows[("lvlm_csp", 0.25)]
    assert csp["stages"][1]["tokens_out"] == csp["visual_tokens_in"] and "relative_ciou" in csp
    assert not result["skipped"], result["skipped"]

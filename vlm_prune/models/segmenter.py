"""A LISA-style reasoning-segmentation model built from stock transformers parts.

    VLM (any supported family, a `[SEG]` token in its vocabulary)
      -> last hidden state at the `[SEG]` position (+ `seg_hidden_offset`)
      -> `text_hidden_fcs` (Linear d->d, ReLU, Linear d->prompt_dim, Dropout(0), as LISA)
      -> the SPARSE prompt of transformers' `SamModel` mask decoder (SAM's own image encoder and its
         "no mask" dense embedding), one mask per `[SEG]` token, single-mask output.

LISA (Lai et al., CVPR 2024, arXiv 2308.00692; github.com/dvlab-research/LISA, `model/LISA.py`) reads the hidden
state one position BEFORE `[SEG]` (its mask is `input_ids[:, 1:] == seg_token_idx`), as GLaMM and PixelLM do:
`seg_hidden_offset=-1`. Sa2VA reads the `[SEG]` position itself: `seg_hidden_offset=0`.

Teacher-forced evaluation (LISA's): the answer "[SEG]." is appended to the prompt, so that `[SEG]` is part of the
prefill and one forward gives every mask (`predict_masks`). `generate_and_segment` generates first and segments
from the generated `[SEG]` tokens (one extra forward over prompt + answer).

Under pruning (`apply_pruning`), the VLM's outputs cover the kept positions only; the `[SEG]` reading position is
text, so it is always kept, and the engine's `last_kept_index` maps it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlm_prune.errors import InputError, PruneError
from vlm_prune.models.segmenter_auto import SegmenterAutoConfig, loading_options, register

CONFIG_NAME = "segmenter_config.json"
HEAD_WEIGHTS = "text_hidden_fcs.safetensors"
SEG_TOKEN = "[SEG]"
ANSWER = "[SEG]."  # the teacher-forced answer (LISA's evaluation)
SEG_HIDDEN_OFFSETS = {"lisa": -1, "sa2va": 0}
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VLM -> the Segmenter built on it


class SegTokenError(PruneError, ValueError):
    """A `[SEG]` token is missing: from the tokenizer, or from a prompt given to the mask path."""


@dataclass
class SegmenterConfig:
    """seg_token_id: the `[SEG]` id in the VLM's vocabulary. seg_hidden_offset: -1 (LISA) or 0 (Sa2VA).
    mask_threshold: logit above which a pixel is in the mask."""

    seg_token_id: int
    seg_hidden_offset: int = -1
    mask_threshold: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class SegmenterOutput:
    """mask_logits: per row, (S, H, W) logits of its S `[SEG]` tokens' masks. seg_embeddings: per row, (S, P)
    prompts given to SAM. seg_hidden: per row, (S, D) the VLM hidden states read. logits: the VLM's logits."""

    mask_logits: list[torch.Tensor]
    seg_embeddings: list[torch.Tensor]
    seg_hidden: list[torch.Tensor]
    logits: torch.Tensor | None = None

    def masks(self, threshold: float = 0.0) -> list[torch.Tensor]:
        return [m > threshold for m in self.mask_logits]


def text_hidden_fcs(hidden: int, prompt_dim: int) -> nn.Sequential:
    """LISA's projection from the LLM width to SAM's prompt width."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, prompt_dim), nn.Dropout(0.0))


def seg_token_id(tokenizer) -> int:
    """The `[SEG]` id of `tokenizer`; a SegTokenError when it has none (add it with `add_seg_token`)."""
    vocab = tokenizer.get_vocab()
    if SEG_TOKEN not in vocab:
        raise SegTokenError(
            f"the tokenizer has no {SEG_TOKEN} token; add it (tokenizer.add_tokens(['{SEG_TOKEN}'], "
            "special_tokens=True) and model.resize_token_embeddings(len(tokenizer))), or load a segmenter checkpoint"
        )
    return int(vocab[SEG_TOKEN])


def add_seg_token(vlm: nn.Module, processor) -> int:
    """Add `[SEG]` to the processor's tokenizer (if missing) and grow the VLM's embeddings to it; returns its id.

    New embedding rows are the mean of the existing ones (transformers' resize default)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    size = max(len(tokenizer), vlm.config.get_text_config().vocab_size)
    if size > vlm.get_input_embeddings().weight.shape[0]:
        vlm.resize_token_embeddings(size)
    return seg_token_id(tokenizer)


class Segmenter(nn.Module):
    """VLM + `[SEG]` + `text_hidden_fcs` + SAM. See the module docstring. `AutoModel.from_pretrained(dir)` loads a
    saved one too (`segmenter_auto`: registered with transformers' Auto classes when this module is imported)."""

    config_class = SegmenterAutoConfig

    def __init__(self, vlm: nn.Module, sam: nn.Module, config: SegmenterConfig):
        super().__init__()
        if config.seg_hidden_offset not in (-1, 0):
            raise PruneError(f"seg_hidden_offset={config.seg_hidden_offset}; use -1 (LISA) or 0 (Sa2VA)")
        text = vlm.config.get_text_config()
        if not 0 <= config.seg_token_id < text.vocab_size:
            raise SegTokenError(
                f"seg_token_id={config.seg_token_id} is outside the VLM's vocabulary of {text.vocab_size}; add "
                f"{SEG_TOKEN} to the tokenizer and resize the embeddings first"
            )
        self.vlm = vlm
        self.sam = sam
        self.config = config
        self.text_hidden_fcs = text_hidden_fcs(text.hidden_size, sam.config.prompt_encoder_config.hidden_size)
        self.handle = None
        _ATTACHED[vlm] = self

    @staticmethod
    def of(vlm: nn.Module) -> Segmenter:
        """The Segmenter built on `vlm` (what a bench task finds from the pruned VLM alone)."""
        segmenter = _ATTACHED.get(vlm)
        if segmenter is None:
            raise PruneError("this VLM is not part of a Segmenter; load one with Segmenter.from_pretrained(dir)")
        return segmenter

    # ---------------------------------------------------------------- pruning
    def apply_pruning(self, method, keep=None, **options):
        """Prune the VLM's visual tokens (`vlm_prune.apply` on it); LVLM_CSP's prune query becomes `[SEG]`."""
        import vlm_prune

        if isinstance(method, str) and "lvlm" in method.lower().replace("_", "-"):
            options.setdefault("query_token_id", self.config.seg_token_id)
        self.remove_pruning()
        self.handle = vlm_prune.apply(self.vlm, method, keep, **options)
        return self.handle

    def remove_pruning(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ---------------------------------------------------------------- forward
    def seg_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per row, (S,) columns whose hidden state is read: each `[SEG]` column + `seg_hidden_offset`.

        A row without `[SEG]` is a SegTokenError (the mask path needs one: append "[SEG]." to the prompt).
        """
        found = input_ids == self.config.seg_token_id
        if attention_mask is not None:
            found &= attention_mask.bool()
        out = []
        for row in range(input_ids.shape[0]):
            columns = found[row].nonzero(as_tuple=True)[0]
            if columns.numel() == 0:
                raise SegTokenError(
                    f"row {row} of the prompt holds no {SEG_TOKEN} token (id {self.config.seg_token_id}); the mask "
                    f"path reads its hidden state: append the answer '{SEG_TOKEN}.' to the prompt (teacher forcing)"
                )
            out.append(columns + self.config.seg_hidden_offset)
        return out

    def forward(
        self, input_ids: torch.Tensor, sam_pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None, **vlm_inputs,
    ) -> SegmenterOutput:  # fmt: skip
        """input_ids (B, L) with `[SEG]` in every row; sam_pixel_values (B, 3, S, S) for SAM's image encoder;
        vlm_inputs: the VLM's media inputs (pixel_values, image_grid_thw, ...). Masks come at `output_size`
        (default SAM's input size)."""
        columns = self.seg_positions(input_ids, attention_mask)
        out = self.vlm(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **vlm_inputs
        )
        last = out.hidden_states[-1]
        kept = None
        handle = _active_handle(self.vlm)
        kept_index = None if handle is None else handle.last_kept_index
        if kept_index is not None and kept_index.shape[1] == last.shape[1]:
            kept = kept_index.to(last.device)  # this prefill's slots -> original columns
        seg_hidden = []
        for row, row_columns in enumerate(columns):
            slots = row_columns.to(last.device)
            if kept is not None:
                slots = torch.stack([(kept[row] == c).nonzero(as_tuple=True)[0][0] for c in slots])
            seg_hidden.append(last[row, slots])
        embeddings = [self.text_hidden_fcs(h) for h in seg_hidden]
        masks = self.decode_masks(sam_pixel_values, embeddings, output_size)
        return SegmenterOutput(masks, embeddings, seg_hidden, out.logits)

    def decode_masks(
        self, sam_pixel_values: torch.Tensor, prompts: list[torch.Tensor], output_size: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """SAM's mask decoder with each row's (S, P) prompts as sparse embeddings -> per row (S, H, W) logits."""
        sam = self.sam
        image_embeddings = sam.vision_encoder(sam_pixel_values).last_hidden_state  # (get_image_embeddings is no_grad)
        positional = sam.get_image_wide_positional_embeddings()
        size = output_size or (sam.config.vision_config.image_size,) * 2
        grid = sam.config.prompt_encoder_config.image_embedding_size
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, grid, grid)
        if len({p.shape[0] for p in prompts}) == 1:  # every row has as many prompts: one batched decoder call
            low_res, _ = sam.mask_decoder(
                image_embeddings=image_embeddings,
                image_positional_embeddings=positional.expand(len(prompts), -1, -1, -1),
                sparse_prompt_embeddings=torch.stack(prompts)[:, :, None, :].to(image_embeddings.dtype),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )  # (B, S, 1, h, w)
            return list(F.interpolate(low_res[:, :, 0], size=size, mode="bilinear", align_corners=False))
        out = []
        for row, prompt in enumerate(prompts):
            low_res, _ = sam.mask_decoder(
                image_embeddings=image_embeddings[row : row + 1],
                image_positional_embeddings=positional,
                sparse_prompt_embeddings=prompt[None, :, None, :].to(image_embeddings.dtype),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )  # (1, S, 1, h, w)
            out.append(F.interpolate(low_res[0, :, :1], size=size, mode="bilinear", align_corners=False)[:, 0])
        return out

    @torch.no_grad()
    def predict_masks(self, input_ids, sam_pixel_values, attention_mask=None, **vlm_inputs) -> list[torch.Tensor]:
        """Teacher-forced masks: per row (S, H, W) bool (the prompt already ends with "[SEG].")."""
        output = self(input_ids, sam_pixel_values, attention_mask=attention_mask, **vlm_inputs)
        return output.masks(self.config.mask_threshold)

    @torch.no_grad()
    def generate_and_segment(self, inputs: dict, sam_pixel_values: torch.Tensor, max_new_tokens: int = 8) -> dict:
        """Generate the answer, then segment from its `[SEG]` tokens. Returns {"sequences", "masks", "stats"};
        rows whose answer has no `[SEG]` get an empty (0, H, W) mask stack."""
        if inputs["input_ids"].shape[0] != 1:
            raise InputError("generate_and_segment takes one prompt at a time; call it per row")
        sequences = self.vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        stats = None if self.handle is None else self.handle.stats
        size = (self.sam.config.vision_config.image_size,) * 2
        if not bool((sequences[:, inputs["input_ids"].shape[1] :] == self.config.seg_token_id).any()):
            return {"sequences": sequences, "masks": [torch.zeros(0, *size, dtype=torch.bool)], "stats": stats}
        masks = self.predict_masks(sequences, sam_pixel_values, **_follow_up_inputs(inputs, sequences))
        return {"sequences": sequences, "masks": masks, "stats": stats}

    @torch.no_grad()
    def segment(self, image, prompt: str, generate: bool = False, processor=None) -> dict:
        """One image and one prompt -> {"masks": (S, H, W) bool at the image's size, "text": the answer, "stats":
        the pruning stats (None unpruned)}. Teacher-forced by default (LISA's evaluation: the answer "[SEG]." is
        appended, one forward); `generate=True` generates the answer first and segments from its `[SEG]` tokens.
        `processor`: the VLM's (default: the one `from_pretrained` found beside the VLM)."""
        from vlm_prune.demo import prepare_inputs
        from vlm_prune.tasks.segmentation import sam_pixel_values

        processor = processor or getattr(self, "processor", None)
        if processor is None:
            raise PruneError("segment() needs the VLM's processor: pass processor=, or load a saved Segmenter folder")
        tokenizer = getattr(processor, "tokenizer", processor)
        inputs = dict(prepare_inputs(self.vlm, processor, [image], [prompt]))
        size = (image.size[1], image.size[0])
        sam = sam_pixel_values([image], self.sam.config.vision_config.image_size).to(inputs["input_ids"].device)
        sam = sam.to(next(self.sam.parameters()).dtype)
        if generate:
            out = self.generate_and_segment(inputs, sam)
            answer = out["sequences"][0, inputs["input_ids"].shape[1] :]
            masks = out["masks"][0][None].float()
            masks = F.interpolate(masks, size=size, mode="nearest")[0].bool() if masks.shape[1] else masks[0].bool()
            return {"masks": masks, "text": tokenizer.decode(answer, skip_special_tokens=False), "stats": out["stats"]}
        answer = tokenizer(ANSWER, add_special_tokens=False, return_tensors="pt").input_ids.to(sam.device)
        full = torch.cat([inputs.pop("input_ids"), answer], dim=1)
        mask = torch.cat([inputs.pop("attention_mask"), torch.ones_like(answer)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
        masks = self.predict_masks(full, sam, attention_mask=mask, output_size=size, **inputs)[0]
        stats = None if self.handle is None else self.handle.stats
        return {"masks": masks, "text": ANSWER, "stats": stats}

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path, processor=None) -> None:
        """`vlm/` and `sam/` (each its own `save_pretrained`; the VLM's `processor` beside it when given), the head's
        weights and `segmenter_config.json`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(directory / "vlm")
        if processor is not None:
            processor.save_pretrained(directory / "vlm")
        self.sam.save_pretrained(directory / "sam")
        state = {key: value.detach().contiguous() for key, value in self.text_hidden_fcs.state_dict().items()}
        save_file(state, str(directory / HEAD_WEIGHTS))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        SegmenterAutoConfig(**asdict(self.config)).save_pretrained(directory)  # config.json, for AutoModel

    @classmethod
    def from_pretrained(cls, directory: str | Path, config=None, **load_options) -> Segmenter:
        """Load a saved Segmenter (a folder, or the name of an embedded demo: "llava_seg"). `load_options`
        (dtype, device_map, ...) go to the VLM's and SAM's loaders; `config` and the hub options that
        `AutoModel.from_pretrained` passes are accepted (the folder's own `segmenter_config.json` is read)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, SamModel

        directory = Path(directory)
        embedded = Path(__file__).resolve().parent.parent / "demo_models" / str(directory)
        if not directory.exists() and (embedded / CONFIG_NAME).exists():
            directory = embedded  # an embedded demo segmenter by name ("llava_seg")
        if not (directory / CONFIG_NAME).exists():
            raise PruneError(f"{directory} holds no {CONFIG_NAME}; save a Segmenter there first (save_pretrained)")
        config = SegmenterConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        load_options = loading_options(load_options)
        vlm = AutoModelForImageTextToText.from_pretrained(directory / "vlm", **load_options).eval()
        sam = SamModel.from_pretrained(directory / "sam", **load_options).eval()
        model = cls(vlm, sam, config)
        model.text_hidden_fcs.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        model.text_hidden_fcs.to(next(vlm.parameters()).dtype)
        if (directory / "vlm" / "tokenizer_config.json").exists():
            from vlm_prune.demo import load_processor

            model.processor = load_processor(directory / "vlm")  # what segment() uses
        return model.eval()


def _active_handle(vlm: nn.Module):
    """The PruneHandle applied to `vlm` (through `apply_pruning` or `vlm_prune.apply`), or None."""
    from vlm_prune.api import _ACTIVE  # the registry apply() keeps of handles per model

    handle = _ACTIVE.get(vlm)
    return None if handle is None or handle._removed else handle


def _follow_up_inputs(inputs: dict, sequences: torch.Tensor) -> dict:
    """The media inputs of `inputs` for one forward over prompt + answer `sequences` (1, L'): the attention mask
    and Qwen's `mm_token_type_ids` extended over the answer (text)."""
    out = {key: value for key, value in inputs.items() if key != "input_ids"}
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
        value = inputs.get(key)
        if value is not None:
            out[key] = torch.cat([value, torch.full((1, extra), fill, dtype=value.dtype, device=value.device)], dim=1)
    return out


register(Segmenter)  # AutoConfig / AutoModel know saved Segmenter folders (transformers' registries)

"""Auto-class registration of the segmenter: `AutoConfig.from_pretrained(dir)` / `AutoModel.from_pretrained(dir)` on a
saved `Segmenter` folder, without `trust_remote_code`.

`Segmenter.save_pretrained` writes a `config.json` whose `model_type` is `MODEL_TYPE` beside its own files;
`register()` (run when `vlm_prune.models.segmenter` is imported) adds `SegmenterAutoConfig` to `AutoConfig` and
`Segmenter` to `AutoModel` through transformers' sanctioned registries (`AutoConfig.register`,
`AutoModel.register`): no transformers class is modified. `AutoModel` then calls `Segmenter.from_pretrained(dir,
config=..., **hub_kwargs)`, which keeps only the loading options its parts understand (`LOAD_OPTIONS`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

MODEL_TYPE = "vlm_prune_segmenter"
LOAD_OPTIONS = ("dtype", "torch_dtype", "device_map", "attn_implementation", "local_files_only")


class SegmenterAutoConfig(PretrainedConfig):
    """The top-level `config.json` of a saved Segmenter: the `SegmenterConfig` fields (the VLM and SAM keep their
    own configs in `vlm/` and `sam/`)."""

    model_type = MODEL_TYPE

    def __init__(self, seg_token_id: int = 0, seg_hidden_offset: int = -1, mask_threshold: float = 0.0,
                 extra: dict | None = None, **kwargs):  # fmt: skip
        self.seg_token_id = seg_token_id
        self.seg_hidden_offset = seg_hidden_offset
        self.mask_threshold = mask_threshold
        self.extra = dict(extra or {})
        super().__init__(**kwargs)


def loading_options(options: dict) -> dict:
    """The options of an `AutoModel.from_pretrained` call that the VLM's and SAM's loaders take."""
    out = {key: options[key] for key in LOAD_OPTIONS if options.get(key) is not None}
    if "torch_dtype" in out:
        out.setdefault("dtype", out.pop("torch_dtype"))
    return out


def register(segmenter_class: type) -> None:
    """Register `SegmenterAutoConfig` with AutoConfig and `segmenter_class` with AutoModel (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(MODEL_TYPE, SegmenterAutoConfig, exist_ok=True)
    AutoModel.register(SegmenterAutoConfig, segmenter_class, exist_ok=True)

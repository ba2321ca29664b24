"""vLLM model classes for opted-in architectures: vLLM's own class, with the visual rows pruned in `embed_multimodal`.

`VlmPruneQwen2_5_VLForConditionalGeneration` and `VlmPruneQwen2VLForConditionalGeneration` subclass vLLM's classes
(registered under their own names; vLLM's classes are untouched); Qwen3-VL's is in `qwen3.py`. They change three
methods:

* `embed_multimodal`: vLLM's tower runs as usual; each item's (n, D) embeddings go through `select.select_item`
  (the transformers engine's selection code) and come back as the k = `count(grid, spec)` kept rows, each with
  `positions.EXTRA` extra columns: its original (t, h, w), its index in the item, the item's lead
  (`positions.media_columns`);
* `recompute_mrope_positions`: strips those columns and writes the kept rows' positions
  (`positions.write_media_positions`; text positions are final before encoding); the runner calls it once the
  flag `is_multimodal_pruning_enabled` is set (`runner.py` sets it on the runners for our models). vLLM's Qwen2-VL
  has no pruning support of its own: the subclass declares `supports_multimodal_pruning` itself;
* `get_mrope_input_positions`: the pruned prompt's positions before encoding (`positions.prompt_positions`).

With `--video-pruning-rate` and `"modalities": ["image"]`, video is pruned by vLLM's own EVS mask
(`compute_retention_mask`) and placed by the same rules (so its text keeps "preserve" positions here).

ZOO-Prune's signal (the merger MLP's input and the MLP split as Linear -> tail) is recorded with a forward
pre-hook on the merger's first linear layer, put on for the tower call and always removed. VisionZip needs the
vision tower's attention, which vLLM's fused vision attention does not expose: refused with a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlm_prune.adapters.base import ProjectorParts
from vlm_prune.errors import PruneError
from vlm_prune.integrations.vllm import compat
from vlm_prune.integrations.vllm.positions import grid_layout, media_columns, prompt_positions, write_media_positions
from vlm_prune.integrations.vllm.select import ItemSignals, item_positions, select_item
from vlm_prune.integrations.vllm.spec import CONFIG_KEY, PruneSpec, llm_grid, spec_from_config

#: our architecture name -> (vLLM module attribute in compat, vLLM class name)
ARCHITECTURES = {
    "VlmPruneQwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "VlmPruneQwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "VlmPruneQwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear over copies of a vLLM linear layer's weight and bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class PruningMixin:
    """What every family's subclass shares: the spec, the selection per item, the signals, the positions."""

    vlm_prune_spec: PruneSpec
    #: vLLM's SupportsMultiModalPruning flag (the runner checks it; Qwen2-VL's own class lacks it)
    supports_multimodal_pruning = True

    def _merger_linears(self) -> tuple[nn.Module, nn.Module]:
        """The merger's two linear layers (the family's projector), whose loaded weights ZOO-Prune reads."""
        raise NotImplementedError

    def load_weights(self, weights):
        loaded = super().load_weights(weights)  # type: ignore[misc]
        if "projector" in self._vlm_prune_built[1].needs:  # ZOO-Prune's signal: the merger as loaded
            self._vlm_prune_merger = _merger_copy(*self._merger_linears())
        return loaded

    def _vlm_prune_init(self, vllm_config) -> None:
        spec = spec_from_config(vllm_config.model_config.hf_config)
        if spec is None:
            raise PruneError(
                f"{type(self).__name__} is vlm_prune's architecture and needs a {CONFIG_KEY!r} setting in "
                f'--hf-overrides, e.g. {{"{CONFIG_KEY}": {{"method": "divprune", "keep": 64}}}}'
            )
        mm_config = vllm_config.model_config.get_multimodal_config()
        rate = getattr(mm_config, "video_pruning_rate", None)
        if spec.prunes("video") and rate is not None and rate > 0:
            raise PruneError(
                f"vLLM's video_pruning_rate={rate} and vlm_prune's {spec.method!r} would both prune video; drop "
                f"--video-pruning-rate (use method 'evs' for vLLM's rule) or set {CONFIG_KEY}.modalities=['image']"
            )
        if spec.method == "visionzip":
            raise PruneError(
                "visionzip needs the vision tower's attention, which vLLM's fused vision attention does not expose; "
                "choose divprune, zoo, pool or random"
            )
        if spec.method == "zoo" and vllm_config.parallel_config.tensor_parallel_size > 1:
            raise PruneError("zoo reads the merger's weights whole; run it with tensor_parallel_size=1")
        method = getattr(mm_config, "video_pruning_method", "evs") or "evs"
        if rate is not None and rate > 0 and method != "evs":
            raise PruneError(
                f"with vlm_prune, vLLM's video pruning runs as EVS only; got video_pruning_method={method!r}"
            )
        self.vlm_prune_spec = spec
        self._vlm_prune_built = spec.build()
        self._vlm_prune_vllm_rate = float(rate) if rate is not None and rate > 0 else None
        config = vllm_config.model_config.hf_config
        self._vlm_prune_media_ids = (int(config.image_token_id), int(config.video_token_id))
        # the runner recomputes M-RoPE positions for pruning models only when this is set (runner.py)
        self.is_multimodal_pruning_enabled = True

    # ---- signals -----------------------------------------------------------------------------------
    def _projector_parts(self) -> ProjectorParts:
        raise NotImplementedError

    def _projector_module(self) -> nn.Module:
        raise NotImplementedError

    def _llm_order(self, grids: list[list[int]]) -> torch.Tensor | None:
        """Permutation putting the merger's rows (the tower's internal order) into LLM order, or None."""
        return None

    @contextlib.contextmanager
    def _record_projector(self) -> Iterator[list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        if "projector" not in self._vlm_prune_built[1].needs:
            yield captured
            return

        def hook(module: nn.Module, args: tuple) -> None:
            captured.append(args[0].detach())

        handle = self._projector_module().register_forward_pre_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def _item_signals(self, captured: list[torch.Tensor], grids: list[list[int]]) -> list[ItemSignals | None]:
        if not captured:
            return [None] * len(grids)
        rows = torch.cat(captured)
        order = self._llm_order(grids)
        if order is not None:
            rows = rows[order.to(rows.device)]
        merge = self.visual.spatial_merge_size
        sizes = [int(t) * int(h) * int(w) // merge // merge for t, h, w in grids]
        if rows.shape[0] != sum(sizes):
            raise PruneError(f"recorded {rows.shape[0]} projector rows for {sum(sizes)} media tokens")
        parts = self._projector_parts()
        return [ItemSignals(projector_inputs=chunk, projector=parts) for chunk in rows.split(sizes)]

    # ---- one modality ------------------------------------------------------------------------------
    def _split_main(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the features the selection sees, columns carried along per row or None): Qwen3-VL's deepstack."""
        return embedding, None

    def _item_rows(
        self, modality: str, kept: torch.Tensor, keep_mask: torch.Tensor, grid: tuple[int, int, int],
        t_factor: float, multimodal_input, index: int,
    ) -> torch.Tensor:
        """One item's rows for the LLM: the kept rows and their position columns (`positions.media_columns`)."""
        coords = item_positions(grid, keep_mask, t_factor)[:, :3]
        return torch.cat([kept, media_columns(coords, 0, kept.dtype).to(kept.device)], dim=1)

    def _vlm_prune_modality(self, modality: str, multimodal_input) -> tuple[torch.Tensor, ...]:
        grids = multimodal_input[f"{modality}_grid_thw"].tolist()
        prunes = self.vlm_prune_spec.prunes(modality)
        with self._record_projector() as captured:
            if modality == "image":
                embeds = self._process_image_input(multimodal_input)
            else:
                embeds = self._process_video_input(multimodal_input)
        vllm_evs = modality == "video" and not prunes and self._vlm_prune_vllm_rate is not None
        signals = self._item_signals(captured, grids) if captured and prunes else [None] * len(grids)
        factors = self._t_factors(modality, multimodal_input, len(grids))
        merge = self.visual.spatial_merge_size
        out = []
        for index, (emb, grid, t_factor, item_signals) in enumerate(zip(embeds, grids, factors, signals)):
            token_grid = llm_grid(grid, merge)
            main, carried = self._split_main(emb)
            if vllm_evs:  # vLLM's own EVS on video, its mask on its features (the whole row, as vLLM does)
                keep_mask = compat.load().evs.compute_retention_mask(
                    emb, tuple(grid), spatial_merge_size=merge, q=self._vlm_prune_vllm_rate
                )
                kept = main[keep_mask]
            else:
                keep_mask, kept = select_item(
                    main, token_grid, modality, self.vlm_prune_spec, self._vlm_prune_built, item_signals
                )
            if carried is not None:  # selected rows of the carried columns (the transformers path: e[visual_keep])
                kept = torch.cat([kept, carried[keep_mask.to(carried.device)]], dim=1)
            out.append(self._item_rows(modality, kept, keep_mask, token_grid, t_factor, multimodal_input, index))
        return tuple(out)

    def _t_factors(self, modality: str, multimodal_input, count: int) -> list[float]:
        if modality != "video":
            return [1.0] * count
        seconds = multimodal_input.get("second_per_grid_ts")
        per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        if seconds is None:
            return [per_second] * count
        return [float(s) * per_second for s in seconds.tolist()]

    def embed_multimodal(self, **kwargs: object):
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not by_modality:
            return []
        out: tuple[torch.Tensor, ...] = ()
        for modality, multimodal_input in by_modality.items():
            if multimodal_input is not None:  # Qwen2-VL names them "images" / "videos"
                out += self._vlm_prune_modality(modality.removesuffix("s"), multimodal_input)
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list):
        grids = list(self.iter_mm_grid_thw(mm_features))  # sorted by offset, (offset, t, h, w, t_factor)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items = [
            (offset, int(feature.mm_position.length), *grid_layout((t, h, w), t_factor))
            for (offset, t, h, w, t_factor), feature in zip(grids, features)
        ]
        return prompt_positions(len(input_tokens), items)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens: int):
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
        with compat.load().gpu_sync_allowed():
            return write_media_positions(
                ids, list(multimodal_embeddings), mrope_positions, num_computed_tokens, self._vlm_prune_media_ids
            )


def _register(module, processor: str, cls: type) -> type:
    """Register our processor for `cls` (vLLM's processing info and dummy inputs of the family, our placeholders)."""
    from vlm_prune.integrations.vllm.processor import pruning_processor

    vllm = compat.load()
    register = vllm.MULTIMODAL_REGISTRY.register_processor(
        pruning_processor(getattr(module, f"{processor}MultiModalProcessor")),
        info=getattr(module, f"{processor}ProcessingInfo"),
        dummy_inputs=getattr(module, f"{processor}DummyInputsBuilder"),
    )
    return register(cls)


def _merger_copy(linear_a: nn.Module, linear_b: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """Copies of two linear layers' weights and biases as loaded (vLLM's CPU GEMM dispatch packs and frees them)."""
    return tuple(
        None if t is None else t.detach().clone()
        for t in (linear_a.weight, linear_a.bias, linear_b.weight, linear_b.bias)
    )


def _qwen2_5_class() -> type:
    module = compat.load().qwen2_5_vl
    base = module.Qwen2_5_VLForConditionalGeneration

    class VlmPruneQwen2_5_VLForConditionalGeneration(PruningMixin, base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vlm_prune_init(vllm_config)

        def _projector_module(self) -> nn.Module:
            return self.visual.merger.mlp

        def _merger_linears(self) -> tuple[nn.Module, nn.Module]:
            return self.visual.merger.mlp[0], self.visual.merger.mlp[2]

        def _projector_parts(self) -> ProjectorParts:
            w0, b0, w2, b2 = self._vlm_prune_merger
            return ProjectorParts(w0, b0, nn.Sequential(self.visual.merger.mlp[1], _linear(w2, b2)))

        def _llm_order(self, grids: list[list[int]]) -> torch.Tensor:
            windows, offset = [], 0
            merge = self.visual.spatial_merge_size
            for t, h, w in grids:
                window_index = self.visual.get_rope_by_thw(int(t), int(h), int(w))[2]
                windows.append(torch.as_tensor(window_index).cpu().long() + offset)
                offset += int(t) * (int(h) // merge) * (int(w) // merge)
            return torch.argsort(torch.cat(windows))

    return _register(module, "Qwen2_5_VL", VlmPruneQwen2_5_VLForConditionalGeneration)


def _qwen2_class() -> type:
    module = compat.load().qwen2_vl
    base = module.Qwen2VLForConditionalGeneration

    class VlmPruneQwen2VLForConditionalGeneration(PruningMixin, base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vlm_prune_init(vllm_config)

        def _projector_module(self) -> nn.Module:
            return self.visual.merger.mlp[0]  # an nn.ModuleList: its first linear layer sees the MLP's input

        def _merger_linears(self) -> tuple[nn.Module, nn.Module]:
            return self.visual.merger.mlp[0], self.visual.merger.mlp[2]

        def _projector_parts(self) -> ProjectorParts:
            w0, b0, w2, b2 = self._vlm_prune_merger
            return ProjectorParts(w0, b0, nn.Sequential(self.visual.merger.mlp[1], _linear(w2, b2)))

        def get_encoder_cudagraph_config(self):
            # the encoder CUDA graph path bypasses embed_multimodal (as Qwen2.5-VL's own class does for EVS)
            config = super().get_encoder_cudagraph_config()
            config.modalities = []
            return config

    return _register(module, "Qwen2VL", VlmPruneQwen2VLForConditionalGeneration)


def _qwen3_class() -> type:
    from vlm_prune.integrations.vllm.qwen3 import qwen3_class

    return qwen3_class()


_CLASSES: dict[str, type] = {}


def model_class(name: str) -> type:
    """Our class for architecture `name` (built once per process, on first use)."""
    if name not in _CLASSES:
        builders = {
            "VlmPruneQwen2_5_VLForConditionalGeneration": _qwen2_5_class,
            "VlmPruneQwen2VLForConditionalGeneration": _qwen2_class,
            "VlmPruneQwen3VLForConditionalGeneration": _qwen3_class,
        }
        if name not in builders:
            raise PruneError(f"unknown vlm_prune architecture {name!r}; known: {sorted(builders)}")
        _CLASSES[name] = builders[name]()
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    """`vlm_prune.integrations.vllm.models:VlmPrune...` resolves lazily (what ModelRegistry's "module:Class" needs)."""
    if name in ARCHITECTURES:
        return model_class(name)
    raise AttributeError(name)

"""vLLM model classes for opted-in architectures: vLLM's own class, with the visual rows pruned in `embed_multimodal`.

`VlmPruneQwen2_5_VLForConditionalGeneration` subclasses vLLM's `Qwen2_5_VLForConditionalGeneration` (registered under
its own name; vLLM's class is untouched) and changes three methods:

* `embed_multimodal`: vLLM's tower runs as usual; each item's (n, D) embeddings go through `select.select_item`
  (the transformers engine's selection code) and come back as the k = `count(grid, spec)` kept rows, each with
  4 extra columns: its original (t, h, w) and the item's extent (`select.item_positions`);
* `recompute_mrope_positions`: vLLM's (4-channel) version, which strips those columns and writes the kept tokens'
  positions into the request's M-RoPE positions; the runner calls it once the flag
  `is_multimodal_pruning_enabled` is set (`runner.py` sets it on the runners for our models);
* `get_mrope_input_positions`: the pruned prompt's positions before encoding (`positions.prompt_positions`).

ZOO-Prune's signal (the merger MLP's input and the MLP split as Linear -> tail) is recorded with a forward
pre-hook on the merger's MLP, put on for the tower call and always removed. VisionZip needs the vision tower's
attention, which vLLM's fused vision attention does not expose: refused with a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlm_prune.adapters.base import ProjectorParts
from vlm_prune.errors import PruneError
from vlm_prune.integrations.vllm import compat
from vlm_prune.integrations.vllm.positions import prompt_positions
from vlm_prune.integrations.vllm.select import ItemSignals, item_positions, select_item
from vlm_prune.integrations.vllm.spec import CONFIG_KEY, PruneSpec, llm_grid, spec_from_config

#: our architecture name -> (vLLM module attribute in compat, vLLM class name)
ARCHITECTURES = {
    "VlmPruneQwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear over copies of a vLLM linear layer's weight and bias."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class PruningMixin:
    """What every family's subclass shares: the spec, the selection per item, the signals."""

    vlm_prune_spec: PruneSpec

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
        self.vlm_prune_spec = spec
        self._vlm_prune_built = spec.build()
        self._vlm_prune_vllm_pruning = bool(rate is not None and rate > 0)
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
    def _vlm_prune_modality(self, modality: str, multimodal_input) -> tuple[torch.Tensor, ...]:
        grids = multimodal_input[f"{modality}_grid_thw"].tolist()
        with self._record_projector() as captured:
            if modality == "image":
                embeds = self._process_image_input(multimodal_input)
            else:
                embeds = self._process_video_input(multimodal_input)
        if not self.vlm_prune_spec.prunes(modality):
            if modality == "video" and self._vlm_prune_vllm_pruning:
                return tuple(self._postprocess_video_embeds_evs(embeds, multimodal_input))
            captured = []
        signals = self._item_signals(captured, grids) if captured else [None] * len(grids)
        factors = self._t_factors(modality, multimodal_input, len(grids))
        merge = self.visual.spatial_merge_size
        out = []
        for emb, grid, t_factor, item_signals in zip(embeds, grids, factors, signals):
            token_grid = llm_grid(grid, merge)
            keep_mask, kept = select_item(
                emb, token_grid, modality, self.vlm_prune_spec, self._vlm_prune_built, item_signals
            )
            positions = item_positions(token_grid, keep_mask, t_factor).to(kept.device)
            out.append(torch.cat([kept, positions.to(kept.dtype)], dim=1))
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
            if multimodal_input is not None:
                out += self._vlm_prune_modality(modality, multimodal_input)
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list):
        merge = self.config.vision_config.spatial_merge_size
        grids = list(self.iter_mm_grid_thw(mm_features))  # sorted by offset, (offset, t, h, w, t_factor)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items = [
            (offset, int(feature.mm_position.length), (t, h, w), t_factor)
            for (offset, t, h, w, t_factor), feature in zip(grids, features)
        ]
        del merge
        return prompt_positions(len(input_tokens), items)


def _qwen2_5_class() -> type:
    vllm = compat.load()
    module = vllm.qwen2_5_vl
    base = module.Qwen2_5_VLForConditionalGeneration
    from vlm_prune.integrations.vllm.processor import pruning_processor

    class VlmPruneQwen2_5_VLForConditionalGeneration(PruningMixin, base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vlm_prune_init(vllm_config)

        def _projector_module(self) -> nn.Module:
            return self.visual.merger.mlp

        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            if "projector" in self._vlm_prune_built[1].needs:
                # vLLM's CPU GEMM dispatch packs linear weights after loading and frees them: keep the merger's
                # MLP weights (ZOO-Prune's projector signal) as they were loaded
                mlp = self.visual.merger.mlp
                self._vlm_prune_merger = tuple(
                    None if t is None else t.detach().clone()
                    for t in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
                )
            return loaded

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

    register = vllm.MULTIMODAL_REGISTRY.register_processor(
        pruning_processor(module.Qwen2_5_VLMultiModalProcessor),
        info=module.Qwen2_5_VLProcessingInfo,
        dummy_inputs=module.Qwen2_5_VLDummyInputsBuilder,
    )
    return register(VlmPruneQwen2_5_VLForConditionalGeneration)


_CLASSES: dict[str, type] = {}


def model_class(name: str) -> type:
    """Our class for architecture `name` (built once per process, on first use)."""
    if name not in _CLASSES:
        builders = {"VlmPruneQwen2_5_VLForConditionalGeneration": _qwen2_5_class}
        if name not in builders:
            raise PruneError(f"unknown vlm_prune architecture {name!r}; known: {sorted(builders)}")
        _CLASSES[name] = builders[name]()
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    """`vlm_prune.integrations.vllm.models:VlmPrune...` resolves lazily (what ModelRegistry's "module:Class" needs)."""
    if name in ARCHITECTURES:
        return model_class(name)
    raise AttributeError(name)

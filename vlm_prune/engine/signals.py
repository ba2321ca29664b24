"""Vision-side signals a pre-LLM stage may ask for, recorded during the same forward.

`SignalRecorder` owns the recordings of one handle: the projector inputs ("projector"), the vision-tower
attention signal ("vision_attention") and the vision tower's pixel input ("pixels"). For one stage it turns
them into per-kind tables aligned with the media tokens (`tables`) and fills each sample's rows into its
`SelectionContext` (`fill`). Hooks are registered through the handle's `add`, so they come off with it.

Tables hold one row per media token the vision tower encoded, in encoding order: {"image": (N_img, ...),
"video": (N_vid, ...)}; generate()'s row expansion (beams, several sequences) repeats them to follow the call
(`adapters.expansion`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlm_prune.adapters.base import Adapter
from vlm_prune.adapters.expansion import expanded_token_index, row_totals
from vlm_prune.engine.context import IMAGE, SCENE, VIDEO, SelectionContext
from vlm_prune.errors import PruneError

KINDS = (("image", IMAGE), ("video", VIDEO), ("scene", SCENE))
KEEP_RECORDINGS = 2  # recordings per kind kept across calls (an image and a video encoder call)


class SignalRecorder:
    """Recordings of vision-side signals for one handle, and their per-sample tables."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.projector_inputs: list[torch.Tensor] = []
        self.vision_attention: list[object] = []
        self.pixel_inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def install(self, needs: set[str], add: Callable) -> None:
        """Register the hooks the stages' `needs` call for (`add` keeps them for removal)."""
        adapter = self.adapter
        if "projector" in needs:
            module = adapter.projector_module()
            if module is None:
                raise PruneError(f"{adapter.family}: no projector to record; this method cannot run here")
            add(module.register_forward_hook(self._on_projector))
        if "vision_attention" in needs:
            module = adapter.vision_attention_layer()
            if module is None:
                raise PruneError(
                    f"{adapter.family}: vision-tower attention is not available on this family; "
                    "choose a method that does not need it"
                )
            add(module.register_forward_pre_hook(self._on_vision_layer, with_kwargs=True))
        if "pixels" in needs:
            module = adapter.vision_module()
            if module is None:
                raise PruneError(f"{adapter.family}: the vision tower's pixel input cannot be recorded here")
            add(module.register_forward_pre_hook(self._on_pixels, with_kwargs=True))

    def clear(self) -> None:
        self.projector_inputs, self.vision_attention, self.pixel_inputs = [], [], []

    def trim(self) -> None:
        """Keep only the latest recordings (generate(use_cache=False) re-runs a prefill without the tower)."""
        lists = (self.projector_inputs, self.vision_attention, self.pixel_inputs)
        if max(map(len, lists)) > KEEP_RECORDINGS:  # (most calls record nothing: one check, no slice deletion)
            for recorded in lists:
                del recorded[:-KEEP_RECORDINGS]

    # ---- hooks
    def _on_projector(self, module, args, output) -> None:
        self.projector_inputs.append(args[0].detach())

    def _on_vision_layer(self, module, args, kwargs) -> None:
        with torch.no_grad():
            self.vision_attention.append(self.adapter.vision_attention_signal(module, args, kwargs))

    def _on_pixels(self, module, args, kwargs) -> None:
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.pixel_inputs.append((pixels.detach(), None if grid is None else grid.detach().cpu()))

    # ---- tables
    def tables(self, needs: frozenset[str], call: dict, layouts: list, original_embeds: torch.Tensor) -> dict | None:
        """Per-kind tables for a stage, and each sample's rows in them ({"tables", "per_sample"}); None if the
        stage needs no vision-side signal. `layouts`: each sample's `VisualLayout` before pruning."""
        adapter = self.adapter
        tables: dict[str, dict[str, torch.Tensor]] = {}
        if "projector" in needs:
            if not self.projector_inputs:
                raise PruneError("the projector input was not recorded (were image features passed precomputed?)")
            tables["projector_inputs"] = adapter.projector_rows(self.projector_inputs, call)
        if "vision_attention" in needs:
            if not self.vision_attention:
                raise PruneError("the vision-tower attention was not recorded (were image features precomputed?)")
            received, keys = adapter.vision_attention_rows(self.vision_attention, call)
            tables["vision_attention"], tables["vision_keys"] = received, keys
        if "pixels" in needs:
            if not self.pixel_inputs:
                raise PruneError(
                    "the vision tower's pixel input was not recorded (were features precomputed?); pass the "
                    "processor's pixel values so the tower runs in the call"
                )
            tables["pixels"] = adapter.pixel_rows(self.pixel_inputs, call)
        if not tables:
            return None
        _expand_tables(tables, call["input_ids"], adapter.kind_token_ids())
        if "projector_inputs" in tables:
            _verify_projector_rows(adapter, tables["projector_inputs"], call["input_ids"], original_embeds)
        per_sample, offsets = [], {name: 0 for name, _ in KINDS}
        for layout in layouts:
            kinds = layout.kind
            table_rows = torch.empty(len(kinds), dtype=torch.long)
            for name, code in KINDS:
                members = (kinds == code).nonzero(as_tuple=True)[0]
                table_rows[members] = torch.arange(offsets[name], offsets[name] + len(members))
                offsets[name] += len(members)
            per_sample.append(table_rows)
        return {"tables": tables, "per_sample": per_sample}

    def fill(self, ctx: SelectionContext, signals: dict, row: int, kinds: torch.Tensor, present: torch.Tensor) -> None:
        """Set the signals of sample `row` on `ctx`, for its tokens still present (`kinds`: their media kinds)."""
        table_rows = signals["per_sample"][row][present]
        for field_name, per_kind in signals["tables"].items():
            values = None
            for name, code in KINDS:
                members = (kinds == code).nonzero(as_tuple=True)[0]
                if len(members) == 0:
                    continue
                table = per_kind.get(name)
                if table is None:
                    raise PruneError(f"the {field_name.replace('_', ' ')} signal is not available for {name} tokens")
                if values is None:
                    values = table.new_empty((len(kinds), *table.shape[1:]))
                values[members.to(table.device)] = table[table_rows[members].to(table.device)]
            setattr(ctx, field_name, values)
        if "projector_inputs" in signals["tables"]:
            parts = self.adapter.projector_parts()
            ctx.projector = parts
            ctx.projector_first = (parts.weight, parts.bias)
            ctx.projector_tail = parts.tail


def _expand_tables(
    tables: dict[str, dict[str, torch.Tensor]], input_ids: torch.Tensor, token_ids: dict[str, int]
) -> None:
    """Repeat encoder-order table rows to follow generate()'s row expansion (beams, several sequences).

    A table holds one row per media token the vision tower encoded; after the expansion the call holds each
    original row's tokens `e` times (see `adapters.expansion`). No-op when the counts already match.
    """
    for name, token_id in token_ids.items():
        totals = row_totals(input_ids, token_id)
        for per_kind in tables.values():
            table = per_kind.get(name)
            if table is not None and table.shape[0] != sum(totals):
                index = expanded_token_index(totals, table.shape[0])
                per_kind[name] = table[index.to(table.device)]


def _verify_projector_rows(
    adapter: Adapter, rows: dict[str, torch.Tensor], input_ids: torch.Tensor, embeds: torch.Tensor
) -> None:
    """The recorded projector inputs must project onto the media embeddings (guards stale recordings)."""
    parts = adapter.projector_parts()
    for name, token_id in adapter.kind_token_ids().items():
        if name not in rows:
            continue
        expected = embeds[input_ids == token_id]
        with torch.no_grad():
            projected = parts(rows[name].to(parts.weight.dtype))
        scale = expected.abs().max().clamp(min=1e-6)
        if projected.shape != expected.shape or (projected - expected).abs().max() > 1e-2 * scale:
            raise PruneError(
                "the recorded projector inputs do not match this input's media embeddings (features "
                "computed outside the model?); pass pixel_values so the vision tower runs in the call"
            )

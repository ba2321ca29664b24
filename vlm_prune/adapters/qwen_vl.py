"""Adapters for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (M-RoPE, 2x2 patch merger, images and video).

Media spans come from the image/video token ids and `image_grid_thw` / `video_grid_thw`: an item of grid
(t, h, w) contributes t * (h/m) * (w/m) tokens (m = spatial merge size), in (t, row, col) raster order.
Qwen3-VL interleaves timestamp text tokens between video frames; tokens are consumed item by item in
sequence order, so those text tokens simply stay text.

Decode fix-up (DESIGN.md trap): with `position_ids=None` and no attention mask, the model derives decode
positions from the cache length plus `rope_deltas`. A pruned cache is shorter, so the adapter injects
positions computed from the unpruned ("virtual") length instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, Adapter, ProjectorParts, SampleMedia, item_counts
from vlm_prune.adapters.expansion import expanded_item_index
from vlm_prune.adapters.media_plan import EMPTY_LAYOUT, HostMedia, MediaPlan, PlanCache, build_plan
from vlm_prune.engine.context import IMAGE, VIDEO, VisualLayout
from vlm_prune.engine.lru import SmallLRU
from vlm_prune.errors import InputError, PruneError


@functools.lru_cache(maxsize=256)
def item_grid(t: int, h: int, w: int) -> torch.Tensor:
    """(t*h*w, 3) long (t, row, col) coordinates of a Qwen media item's LLM grid in raster order (cached per grid:
    read-only, callers that write take a copy)."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def _layout_of(key: tuple[tuple[int, int, int, int], ...]) -> VisualLayout:
    """The layout of a sample whose media items (kind, t, h, w) follow each other in this order."""
    grid = torch.cat([item_grid(t, h, w) for _, t, h, w in key])
    sizes = torch.tensor([t * h * w for _, t, h, w in key])
    media_index = torch.repeat_interleave(torch.arange(len(key)), sizes)
    kind = torch.repeat_interleave(torch.tensor([item[0] for item in key]), sizes)
    return VisualLayout(media_index, kind, grid[:, 0].clone(), grid, [tuple(item[1:]) for item in key])


@dataclass(frozen=True)
class MRopeState:
    """What decoding after a pruned prefill needs of Qwen's M-RoPE: the prefill's `rope_deltas` (B, 1), a copy, and
    `source`, the tensor the model held then (generate() adds the model's current `rope_deltas` to its decode
    positions: while it is still that tensor, they are right)."""

    deltas: torch.Tensor
    source: torch.Tensor


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    rope_rows = 3
    signals = frozenset({"projector", "vision_attention", "pixels"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layouts: SmallLRU[VisualLayout] = SmallLRU(32)  # per-sample layouts by their items' (kind, grid)
        self._plans = PlanCache(32)  # per-batch plans by (rows' media-kind sequences, items)
        self._delta_rows: tuple | None = None  # (state, batch, device, dtype) -> (4, B, 1) offsets of the M-RoPE rows
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.visual = model.model.visual
        self._vision_calls_grid: torch.Tensor | None = None

    def media_token_ids(self) -> list[int]:
        return [self.image_token_id, self.video_token_id]

    def _items(self, grid_thw: torch.Tensor | None) -> list[tuple[int, int, int]]:
        if grid_thw is None:
            return []
        return [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in grid_thw.tolist()]

    def vision_module(self) -> nn.Module:
        return self.visual

    def _grids(self, call: dict, modality: str) -> torch.Tensor | None:
        """Grids of one modality as the vision tower saw them: from the call, else from the recorded
        vision-tower calls (generate() passes only the encoded features, possibly expanded for beams)."""
        grid = call.get(f"{modality}_grid_thw")
        if grid is not None:
            return grid
        counts = item_counts(call, modality)
        if counts is None:
            return None
        totals = self._row_totals(call, modality)
        for recorded in self._recorded_candidates(call, modality):
            sizes = self._merged_sizes(recorded)
            if sizes == counts:
                return recorded
            if len(counts) == 1 and sum(sizes) == counts[0] == sum(totals):
                # generate(prefill_chunk_size=N) hands a chunk its features as one block: every item of the
                # encoder call is in this chunk, so the recorded grids still describe its tokens
                return recorded
            try:
                expanded = [sizes[item] for item in expanded_item_index(totals, sizes)]
            except InputError:
                continue
            if expanded == counts:
                return recorded
        raise InputError(
            f"cannot find the {modality} grids; pass {modality}_grid_thw as the processor returns it. "
            f"{SPLIT_MEDIA_HINT}"
        )

    @staticmethod
    def _recorded_candidates(call: dict, modality: str) -> list[torch.Tensor]:
        """Recorded vision-tower grids that may be this modality's, newest first.

        The model (and generate()'s pre-encoding) runs the tower on the images first, then on the videos, so
        when the call brings both kinds the newest pair is (image grids, video grids): the candidates for a kind
        are taken at its place in each such group. Checking sizes alone is not enough, as image and video items
        can have the same token totals.
        """
        recorded = [grid for grid in call.get("vision_calls", []) if grid is not None]
        present = [name for name in ("image", "video") if item_counts(call, name) is not None]
        if modality not in present or len(recorded) < len(present):
            return recorded[::-1]
        group, slot = len(present), present.index(modality)
        return recorded[len(recorded) - group + slot :: -group]

    def _call_grids(self, call: dict, modality: str) -> torch.Tensor | None:
        """Grids of the call's media items in call order: the encoder's grids, expanded as generate() expanded
        the rows for num_beams / num_return_sequences (see `adapters.expansion`)."""
        grid = self._grids(call, modality)
        if grid is None or call.get(f"{modality}_grid_thw") is not None:
            return grid
        sizes, totals = self._merged_sizes(grid), self._row_totals(call, modality)
        if sum(totals) == sum(sizes):
            return grid
        return grid[expanded_item_index(totals, sizes)]

    def _merged_sizes(self, grid_thw: torch.Tensor) -> list[int]:
        return [int(t * h * w) // (self.merge * self.merge) for t, h, w in grid_thw.tolist()]

    def _row_totals(self, call: dict, modality: str) -> list[int]:
        """Placeholders of the modality per row, on the host ids (numpy: ~1 us a call against 5-10 us in torch)."""
        token_id = self.image_token_id if modality == "image" else self.video_token_id
        return (call["input_ids"].cpu().numpy() == token_id).sum(axis=1).tolist()

    def check_media_inputs(self, call: dict) -> None:
        """Pixel rows must match the grids: t*h*w patch rows per item (else the tower fails with a shape error)."""
        for pixels_key, grid_key, what in (
            ("pixel_values", "image_grid_thw", "images"),
            ("pixel_values_videos", "video_grid_thw", "videos (frames / temporal_patch_size steps)"),
        ):
            pixels, grid = call.get(pixels_key), call.get(grid_key)
            if pixels is None or grid is None:
                continue
            expected = int(grid.prod(dim=-1).sum())
            if int(pixels.shape[0]) != expected:
                raise InputError(
                    f"{pixels_key} has {pixels.shape[0]} patch rows but {grid_key} {grid.tolist()} needs {expected} "
                    f"for its {what}; pass the processor's {pixels_key} and {grid_key} together, unchanged"
                )

    def sample_media(self, input_ids: torch.Tensor, call: dict, inputs_embeds: torch.Tensor) -> list[SampleMedia]:
        # the columns from one flatnonzero over the host ids; which item every placeholder belongs to is a pure
        # function of the rows' media-kind sequences and the items, planned once per such signature (`media_plan`)
        image_items = self._items(self._call_grids(call, "image"))
        video_items = self._items(self._call_grids(call, "video"))
        host = HostMedia.of(input_ids, (self.image_token_id, self.video_token_id), call)
        key = (tuple(image_items), tuple(video_items))
        return self._plans.samples(host, key, lambda: self._plan(host, image_items, video_items))

    def _plan(self, host: HostMedia, image_items: list[tuple], video_items: list[tuple]) -> MediaPlan:
        """Each row takes the next whole items of each kind (in order) its placeholders of that kind hold; on
        ranks (see `media_plan`): `columns` below are positions among the row's media tokens. Every media token
        is visual, so a row's visual columns are its media columns, ascending (sorted or interleaved items)."""
        queues = {IMAGE: image_items, VIDEO: video_items}
        next_item = {IMAGE: 0, VIDEO: 0}
        rows = []
        for row_ranks in host.row_ranks():
            pieces = []  # (first column, kind, columns, grid block, grid size, last column)
            for (kind, grids), columns in zip(queues.items(), row_ranks):
                start = 0
                while start < len(columns):
                    if next_item[kind] >= len(grids):
                        name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                        raise InputError(
                            f"more media tokens than items in {name}; pass the processor output. {SPLIT_MEDIA_HINT}"
                        )
                    t, h, w = grids[next_item[kind]]
                    next_item[kind] += 1
                    count = t * h * w
                    item_columns = columns[start : start + count]
                    if len(item_columns) != count:
                        name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                        raise InputError(
                            f"a media item of grid {(t, h, w)} (merged) needs {count} tokens, but its sample holds "
                            f"{len(item_columns)} more; the {name} does not match the placeholders. Pass the "
                            f"processor's input_ids with the {name} it returned. {SPLIT_MEDIA_HINT}"
                        )
                    first, last = int(item_columns[0]), int(item_columns[-1])
                    pieces.append((first, kind, item_columns, item_grid(t, h, w), (t, h, w), last))
                    start += count
            pieces.sort(key=lambda piece: piece[0])
            if not pieces:
                rows.append((None, EMPTY_LAYOUT))
                continue
            if all(a[5] < b[0] for a, b in zip(pieces, pieces[1:])):  # items do not interleave: sorted
                key = tuple((p[1], *p[4]) for p in pieces)
                rows.append((None, self._layouts.get(key, partial(_layout_of, key))))
                continue
            columns = torch.from_numpy(np.concatenate([p[2] for p in pieces]))
            grid = torch.cat([p[3] for p in pieces])
            media_index = torch.cat([torch.full((len(p[2]),), i, dtype=torch.long) for i, p in enumerate(pieces)])
            kind = torch.cat([torch.full((len(p[2]),), p[1], dtype=torch.long) for p in pieces])
            order = torch.argsort(columns)
            layout = VisualLayout(
                media_index=media_index[order],
                kind=kind[order],
                frame=grid[order, 0].clone(),
                grid_thw=grid[order],
                media_grid=[p[4] for p in pieces],
            )
            rows.append((None, layout))
        for kind, grids in queues.items():
            if next_item[kind] != len(grids):
                name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                raise InputError(
                    f"{name} holds {len(grids)} items but the placeholders hold only {next_item[kind]}; the grid "
                    f"does not match the placeholders. Pass the processor's input_ids with the {name} it returned. "
                    f"{SPLIT_MEDIA_HINT}"
                )
        return build_plan(host, rows)

    def lm_position_ids(self, contiguous: torch.Tensor) -> torch.Tensor:
        return contiguous.expand(self.rope_rows + 1, -1, -1)  # (B, L) -> (rows + 1, B, L): one view op

    def decode_position_ids(
        self, call: dict, virtual_past: int, q_len: int, batch: int, state: object = None
    ) -> torch.Tensor | None:
        if call.get("attention_mask") is not None:
            return None  # the model derives positions from the full-length mask: already right
        rope_deltas = state.deltas if state is not None else getattr(self.model.model, "rope_deltas", None)
        device = rope_deltas.device if rope_deltas is not None else None
        positions = torch.arange(virtual_past, virtual_past + q_len, device=device).view(1, 1, -1).expand(3, batch, -1)
        if rope_deltas is not None:  # stays on the device: a decode step reads nothing back
            delta = rope_deltas.repeat_interleave(batch // rope_deltas.shape[0], dim=0)
            positions = positions + delta.view(1, batch, 1)
        return positions

    def position_state(self) -> MRopeState | None:
        """The prefill's `rope_deltas` (B, 1): M-RoPE position minus column of every text token after the media."""
        deltas = getattr(self.model.model, "rope_deltas", None)
        return None if deltas is None else MRopeState(deltas.detach().clone(), deltas)

    def follow_up_position_ids(self, position_ids: torch.Tensor, state: object) -> torch.Tensor | None:
        """Text after the media sits at (text position + rope_delta) on every M-RoPE row.

        generate() builds a later turn's M-RoPE rows from `mm_token_type_ids[:, physical cache length:]`; on a pruned
        cache that slice reaches the first turn's media placeholders, so it takes them for new media, finds no grids
        and zeroes the deltas. The text row (row 0, from the full-length mask) is right; rebuild the others from it.
        Only ids of that shape (M-RoPE rows equal to the text row) are rebuilt: real M-RoPE rows are the model's
        own (e.g. generate()'s decode positions after right padding) and stay as the unwrapped model has them.
        """
        if state is None or position_ids.ndim != 3 or position_ids.shape[0] != self.rope_rows + 1:
            return None
        if getattr(self.model.model, "rope_deltas", None) is state.source:
            # the model still holds the prefill's own deltas, so generate() built these rows from them: right as they
            # are (decided on the host: a plain decode step makes no device op here)
            return None
        batch = position_ids.shape[1]
        key = (batch, position_ids.device, position_ids.dtype)
        if self._delta_rows is None or self._delta_rows[0] is not state or self._delta_rows[1] != key:
            deltas = state.deltas
            delta = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(position_ids.device).view(1, batch, 1)
            offsets = torch.cat([torch.zeros_like(delta), delta.expand(self.rope_rows, -1, -1)]).to(position_ids.dtype)
            self._delta_rows = (state, key, offsets)  # once per cached prefill: decode steps add it
        text = position_ids[:1]
        # decided on the device (no read back per decode step): rebuilt where the rows equal the text row (row 0
        # equals itself, so comparing every row is the same test, one op fewer)
        return torch.where((position_ids == text).all(), text + self._delta_rows[2], position_ids)

    # ---- projector (merger) --------------------------------------------------------------------
    def projector_module(self) -> nn.Module:
        return self.visual.merger.mlp

    def projector_parts(self) -> ProjectorParts:
        mlp = self.projector_module()
        return ProjectorParts(mlp[0].weight, mlp[0].bias, mlp[1:])

    def _merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        return None

    # ---- vision-tower attention (VisionZip): the last full-attention block, mean attention received
    def vision_attention_layer(self) -> nn.Module:
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return self.visual.blocks[full[-1] if full else -1]

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> object:
        from vlm_prune.adapters.vision_signals import qwen2vl_block_mean_attention

        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs.get("cu_seqlens")
        window_index = None
        grid = self._vision_calls_grid
        if grid is not None:
            window_index = self._merger_order(grid)
        return qwen2vl_block_mean_attention(
            module,
            hidden,
            cu_seqlens,
            kwargs.get("position_embeddings"),
            spatial_merge_unit=self.merge * self.merge,
            window_index=window_index,
        )

    def record_vision_call(self, args: tuple, kwargs: dict) -> object:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        grid = None if grid is None else grid.detach().cpu()  # one read (none when the engine passes its host copy)
        self._vision_calls_grid = grid
        pixels = args[0] if args else kwargs.get("hidden_states")
        if grid is not None and isinstance(pixels, torch.Tensor) and pixels.shape[0] != int(grid.prod(-1).sum()):
            raise InputError(
                f"the vision tower got {pixels.shape[0]} patch rows for grids {grid.tolist()} (they need "
                f"{int(grid.prod(-1).sum())}); pass pixel_values(_videos) and image/video_grid_thw as the processor "
                "returns them"
            )
        return self._vision_calls_grid

    def vision_attention_rows(self, recorded: list, call: dict):
        received_tables, key_tables = {}, {}
        present = [name for name in ("image", "video") if self._grids(call, name) is not None]
        for name, (received, keys) in zip(present, recorded[-len(present) :] if present else []):
            received_tables[name], key_tables[name] = received, keys
        return received_tables, key_tables

    def pixel_rows(self, recorded: list, call: dict) -> dict[str, torch.Tensor]:
        """The tower's input rows are patches in merge-group order (the processor's layout), so the m*m rows of
        one merged token are consecutive: (N_patches, P) -> (N_tokens, m*m*P), per kind by its grids."""
        rows: dict[str, torch.Tensor] = {}
        for name in ("image", "video"):
            grid = self._grids(call, name)
            if grid is None:
                continue
            match = next((p for p, g in reversed(recorded) if g is not None and torch.equal(g, grid.cpu())), None)
            if match is None:
                raise PruneError(f"the vision tower's {name} pixels were not recorded in this call; pass pixel values")
            rows[name] = match.reshape(-1, self.merge * self.merge * match.shape[-1])
        return rows

    def projector_rows(self, captured: list[torch.Tensor], call: dict) -> dict[str, torch.Tensor]:
        rows: dict[str, torch.Tensor] = {}
        present = sum(self._grids(call, name) is not None for name in ("image", "video"))
        calls = iter(captured[-present:] if present else [])
        for name in ("image", "video"):
            grid = self._grids(call, name)
            if grid is None:
                continue
            features = next(calls, None)
            if features is None:
                raise PruneError("the projector input was not recorded; was the vision tower bypassed?")
            order = self._merger_order(grid)
            rows[name] = features if order is None else features[torch.argsort(order.to(features.device))]
        return rows


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"

    def _merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.visual.spatial_merge_size,
            window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        return window_index


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: also compacts the deepstack inputs (`visual_pos_masks`, `deepstack_visual_embeds`)."""

    family = "qwen3_vl"
    signals = frozenset({"projector", "pixels"})

    def vision_attention_layer(self) -> nn.Module | None:
        return None  # not validated against Qwen3-VL's vision blocks yet

    def projector_module(self) -> nn.Module:
        return self.visual.merger.linear_fc1

    def projector_parts(self) -> ProjectorParts:
        merger = self.visual.merger
        tail = nn.Sequential(merger.act_fn, merger.linear_fc2)
        return ProjectorParts(merger.linear_fc1.weight, merger.linear_fc1.bias, tail)

    def compact_lm_kwargs(self, kwargs: dict, keep_columns: torch.Tensor, visual_keep: torch.Tensor) -> None:
        """keep_columns: (B, L') original columns (-1 = pad slot); visual_keep: (N_visual_total,) bool,
        row-major over the batch, True where the visual token survives."""
        masks = kwargs.get("visual_pos_masks")
        if masks is None:
            return
        from vlm_prune.kernels import gather_tokens

        kwargs["visual_pos_masks"] = gather_tokens(masks.unsqueeze(-1), keep_columns.to(masks.device)).squeeze(-1)
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds:  # the kept rows found once (on the host mask: no sync), then one index_select per layer
            kept = visual_keep.nonzero().view(-1).to(embeds[0].device)
            kwargs["deepstack_visual_embeds"] = [e.index_select(0, kept.to(e.device)) for e in embeds]

    def check_layer_stage(self, layer: int) -> None:
        depth = len(getattr(self.visual, "deepstack_visual_indexes", []))
        if 0 < layer < depth:
            raise PruneError(
                f"Qwen3-VL adds deepstack features at decoder layers 0..{depth - 1}; in-LLM stages must run at "
                f"layer >= {depth} (or at layer 0)"
            )

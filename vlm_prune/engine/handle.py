"""The engine: per-instance hooks that prune visual tokens inside one model's forward.

Flow of one prefill that holds media:
1. Top-level pre-hook: remember the call's kwargs (input ids, grids) for the language-model hook.
2. Projector hook (only if a stage needs it): record the projector input.
3. Language-model pre-hook: find each sample's visual columns from the input ids, run the pre-LLM
   stages on `inputs_embeds`, gather the kept columns (re-padding rows on the left if their counts
   differ), and pass the language model an explicit 2-D mask, CONTIGUOUS position ids (so masking
   and flash-attention never mistake gapped positions for packed sequences) and, through a pre-hook
   on the rotary embedding, the TRUE positions of the kept tokens (policy "preserve") or renumbered
   ones (policy "compact").
4. Decoder-layer pre-hooks (only with in-LLM stages): at stage layer k, score with the hidden states
   (and attention rows of layer k-1 recomputed from q/k), compact, and hand every later layer the
   compacted mask, position embeddings and position ids.
5. Language-model post-hook: trim the caches of layers below the last stage to the kept tokens
   (option `trim_cache`), record stats, and keep what decoding needs: the original columns of the
   cached tokens, the unpruned length and the position shift.

Decode steps (or any continuation on the same cache) map the caller's 2-D mask, which spans the
ORIGINAL sequence, onto the cached columns, and keep positions consistent with the policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, Adapter, SampleMedia
from vlm_prune.engine.attention_rows import stage_rows_fn
from vlm_prune.engine.budget import tokens_to_keep
from vlm_prune.engine.context import VIDEO, Selection, SelectionContext, VisualLayout
from vlm_prune.engine.followup import cut_leading, resent_overlap
from vlm_prune.engine.labels import kept_labels, with_loss
from vlm_prune.engine.ragged import positions_within as _positions_within
from vlm_prune.engine.ragged import trim_segments
from vlm_prune.engine.reentry import reenter_tokens, remember
from vlm_prune.engine.segments import segments_fn
from vlm_prune.engine.signals import KEEP_RECORDINGS, SignalRecorder
from vlm_prune.engine.stats import LayerShape, PruneStats, StageStats
from vlm_prune.errors import AttentionImplementationError, InputError, MediaKindError, PruneError
from vlm_prune.kernels import compact_sequence, gather_tokens
from vlm_prune.methods.base import Stage

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
POSITION_POLICIES = ("preserve", "compact")


@dataclass
class _Sample:
    """Per-sample bookkeeping during one prefill."""

    media: SampleMedia
    original_counts: list[int]  # visual tokens per media item before pruning
    present: torch.Tensor  # (N0,) bool over `media.visual_columns`: which are still present
    layout: VisualLayout  # layout of the tokens still present (`media.layout.select(present)`, kept up to date)

    @property
    def visual_columns(self) -> torch.Tensor:
        """(N,) original columns of the visual tokens still present, ascending."""
        return self.media.visual_columns[self.present]


@dataclass
class _Forward:
    """State of one language-model forward (prefill or continuation)."""

    prefill: bool
    columns: torch.Tensor  # (B, L) original column of every slot, -1 = pad slot we added
    mask: torch.Tensor  # (B, past + L) 2-D attention mask over the cached + current slots
    rope: torch.Tensor  # (R, B, L) rotary positions of the current slots
    samples: list[_Sample] = field(default_factory=list)
    shift: torch.Tensor | None = None  # (B,) positions removed so far (policy "compact")
    # per in-LLM segment: (first layer, columns of the segment's slots) -- for cache trimming
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    overrides: dict | None = None  # kwargs handed to every layer after an in-LLM stage
    layer_masks: dict[int, object] = field(default_factory=dict)  # decode masks per layer (no trimming)
    # (layer index, input hidden states, position embeddings, cache) of the layer before an attention stage
    attention_input: tuple | None = None
    stats: PruneStats | None = None
    visual_keep_flat: torch.Tensor | None = None
    original_embeds: torch.Tensor | None = None
    reentry: dict = field(default_factory=dict)  # row -> `reentry.RowMemory` of tokens that may come back


CACHE_STATE_ATTRIBUTE = "_vlm_prune_state"


@dataclass
class _Cached:
    """What decoding after a pruned prefill needs. It rides on the cache object itself (attribute
    `CACHE_STATE_ATTRIBUTE`), so it follows the cache into `copy.deepcopy` (transformers' prompt-reuse
    pattern), into several conversations through one handle, and into a later handle."""

    original_length: int  # L0: length of the unpruned prefill
    shift: torch.Tensor  # (B,) positions removed (policy "compact"); zeros under "preserve"
    # per segment: (first layer, (B, L_seg) original columns of its cached prefill slots)
    segments: list[tuple[int, torch.Tensor]]
    prefill_mask: list[torch.Tensor]  # per segment: (B, L_seg) mask of its cached prefill slots
    tokens: torch.Tensor | None = None  # (B, virtual past) the ORIGINAL token ids the cache stands for
    position_state: object = None  # the adapter's `position_state()` after the prefill (Qwen: rope_deltas)

    def virtual_past(self, past: int) -> int:
        """The unpruned length so far, for `past` cached positions in the first segment's layers."""
        return self.original_length + past - self.segments[0][1].shape[1]

    def drop_prefill_tail(self, count: int) -> None:
        """Follow a `cache.crop` that removed the last `count` slots of the prefill (assisted decoding feeds
        candidate tokens with the prompt and crops the rejected ones).

        Allowed while those slots are the last `count` ORIGINAL columns in every row and segment (text after
        the last pruned token); a crop that reaches pruned tokens cannot be mapped and is refused.
        """
        tail = torch.arange(self.original_length - count, self.original_length)
        for _, columns in self.segments:
            if columns.shape[1] < count or not torch.equal(columns[:, -count:].cpu(), tail.expand(len(columns), -1)):
                raise InputError(
                    "this cache holds a pruned prefill and was cropped into its pruned part, so its positions no "
                    "longer map to the original sequence; crop only the tokens after the last image, or prefill "
                    "again"
                )
        self.segments = [(layer, columns[:, :-count]) for layer, columns in self.segments]
        self.prefill_mask = [mask[:, :-count] for mask in self.prefill_mask]
        self.original_length -= count


class PruneHandle:
    """Pruning attached to one model instance. `remove()` (or leaving `pruned(...)`) restores it exactly.

    Attributes:
        stats: `PruneStats` of the last prefill that held media.
        last_kept_index: (B, L_kept) original column of each position of the last pruned output
            (-1 = padding slot added to align rows); the prefill logits follow this order.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        stages: list[Stage],
        *,
        position_policy: str = "preserve",
        trim_cache: bool = True,
        seed: int = 0,
        methods: list | None = None,
    ):
        if position_policy not in POSITION_POLICIES:
            raise PruneError(f"position_policy={position_policy!r}; choose one of {POSITION_POLICIES}")
        implementation = getattr(adapter.text_config, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise AttentionImplementationError(
                f"attention implementation {implementation!r} is not supported; load the model with "
                f"attn_implementation= one of {SUPPORTED_ATTENTION}"
            )
        self.model = model
        self.adapter = adapter
        self.methods = methods or []
        self.stages = sorted(stages, key=lambda stage: stage.layer)
        self.position_policy = position_policy
        self.trim_cache = trim_cache
        self.seed = seed
        self.shape = LayerShape.from_config(adapter.text_config)
        num_layers = len(adapter.layers)
        for stage in self.stages:
            if not 0 <= stage.layer < num_layers:
                raise PruneError(
                    f"stage {stage.name!r} runs at layer {stage.layer}, but the model has {num_layers} decoder "
                    "layers (0 = pre-LLM, k = input of layer k)"
                )
            if stage.layer:
                adapter.check_layer_stage(stage.layer)
            missing = set(stage.needs) - {"attention"} - set(adapter.signals)
            if missing:
                raise PruneError(
                    f"{stage.name} needs {sorted(missing)}, which {adapter.family} models cannot provide yet; "
                    f"choose a method without them (see vlm_prune.methods())"
                )
            if "attention" in stage.needs and stage.layer == 0:
                raise PruneError(f"stage {stage.name!r} needs attention rows, which exist only at layer >= 1")
        self.stats = PruneStats()
        self.last_kept_index: torch.Tensor | None = None
        self._call: dict | None = None
        self._signals = SignalRecorder(adapter)
        self._vision_calls: list[object] = []
        self._forward: _Forward | None = None
        self._pending_rope: torch.Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removed = False
        self._labels: torch.Tensor | None = None
        self._loss_kwargs: dict = {}
        self._kept_this_call: torch.Tensor | None = None
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        add = self._hooks.append
        add(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        add(self.model.register_forward_hook(self._on_model_return, always_call=True))
        lm = self.adapter.language_model
        add(lm.register_forward_pre_hook(self._on_lm_call, with_kwargs=True))
        add(lm.register_forward_hook(self._on_lm_return, with_kwargs=True))
        add(self.adapter.rotary.register_forward_pre_hook(self._on_rotary, with_kwargs=True))
        vision = self.adapter.vision_module()
        if vision is not None:
            add(vision.register_forward_pre_hook(self._on_vision_call, with_kwargs=True))
        self._signals.install(set().union(*(stage.needs for stage in self.stages)), add)
        in_llm = [stage.layer for stage in self.stages if stage.layer > 0]
        if in_llm:
            first = min(in_llm)
            needs_rows = any("attention" in stage.needs for stage in self.stages)
            start = max(0, first - 1) if needs_rows else first
            for index in range(start, len(self.adapter.layers)):
                hook = self._make_layer_hook(index)
                add(self.adapter.layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before `apply()`.

        A cache filled while pruning still holds the pruned sequence: continue it only while a handle is
        applied to the model (any handle; the mapping travels with the cache), or start a new one.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._call = self._forward = self._pending_rope = None
        self._signals.clear()
        self._vision_calls = []
        self._removed = True

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = "+".join(stage.name for stage in self.stages)
        return f"PruneHandle({names}, policy={self.position_policy}, trim_cache={self.trim_cache})"

    # ------------------------------------------------------------------ top level
    def _on_model_call(self, module, args, kwargs):
        # labels span the ORIGINAL sequence; the loss is computed on the kept positions after the forward
        self._labels = kwargs.pop("labels", None)
        self._loss_kwargs = {key: kwargs[key] for key in ("num_items_in_batch", "ignore_index") if key in kwargs}
        self._kept_this_call = None
        cache = _cache_of(kwargs)
        cached = self._live_cached(cache)
        resent = cached is not None and self._follow_up(kwargs, cached, cache)
        result = self._on_model_call_inner(args, kwargs, cache, cached)
        return (args, kwargs) if (resent or self._labels is not None) and result is None else result

    def _follow_up(self, kwargs: dict, cached: _Cached, cache) -> bool:
        """A call on a pruned cache: cut what it re-sends (see `followup`) and record the tokens it adds.

        Returns whether it cut anything. The token record stands for the cached positions only, so it is
        first cut to them (a cache cropped after the prefill holds fewer).
        """
        if cached.tokens is None:
            return False
        past = cache.get_seq_length(cached.segments[0][0])
        virtual_past = cached.virtual_past(past)
        cached.tokens = cached.tokens[:, :virtual_past]
        input_ids = kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            return False
        overlap = resent_overlap(input_ids, cached.tokens, past, virtual_past, kwargs.get("attention_mask"))
        if overlap:
            cut_leading(kwargs, overlap, input_ids.shape[1])
        new_tokens = kwargs["input_ids"].detach().cpu()
        if new_tokens.shape[0] == cached.tokens.shape[0]:
            cached.tokens = torch.cat([cached.tokens, new_tokens], dim=1)
        return bool(overlap)

    def _on_model_call_inner(self, args, kwargs, cache, cached: _Cached | None):
        """Record the call for the language-model hook; inject decode positions on a pruned cache."""
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        if any(call.get(key) is not None for key in ("pixel_values", "pixel_values_videos")):
            # media is encoded inside this call: older recordings are stale
            self._signals.clear()
            self._vision_calls = []
        call["vision_calls"] = self._vision_calls
        self._call = call
        if _brings_media(call):
            self.adapter.check_media_inputs(call)
        if cached is None or call.get("input_ids") is None or _brings_media(call):
            return None
        input_ids, state = call["input_ids"], cached.position_state
        if call.get("position_ids") is not None:
            positions = self.adapter.follow_up_position_ids(call["position_ids"], state)
        else:
            virtual_past = cached.virtual_past(cache.get_seq_length(cached.segments[0][0]))
            positions = self.adapter.decode_position_ids(call, virtual_past, *input_ids.shape[::-1], state)
        if positions is None:
            return None
        kwargs["position_ids"] = positions.to(input_ids.device)
        return args, kwargs

    def _on_model_return(self, module, args, output):
        labels, self._labels = self._labels, None
        if labels is not None:
            output = self._with_loss(output, labels)
        self._call = None
        # generate(use_cache=False) re-runs the prefill from pre-encoded features without calling the
        # vision tower again, so the latest recordings are kept (bounded) rather than cleared.
        self._signals.trim()
        del self._vision_calls[:-KEEP_RECORDINGS]
        self._forward = None
        self._pending_rope = None
        return output if labels is not None else None

    def _with_loss(self, output, labels: torch.Tensor):
        """`output` with the model's own loss over the positions the logits have (the kept tokens)."""
        logits = output[0] if isinstance(output, tuple) else output.logits
        kept = self._kept_this_call
        if kept is not None:
            labels = kept_labels(labels, kept.to(labels.device), self._loss_kwargs.get("ignore_index", -100))
        if labels.shape[:2] != logits.shape[:2]:
            raise InputError(
                f"labels of shape {tuple(labels.shape)} do not match the {tuple(logits.shape[:2])} positions of "
                "the logits; pass labels over the input_ids (one per token), or none with logits_to_keep"
            )
        loss = self.model.loss_function(
            logits=logits, labels=labels, vocab_size=self.adapter.text_config.vocab_size, **self._loss_kwargs
        )
        return with_loss(output, loss)

    def _on_vision_call(self, module, args, kwargs):
        self._vision_calls.append(self.adapter.record_vision_call(args, kwargs))

    def _has_media(self, input_ids: torch.Tensor) -> bool:
        return any(bool((input_ids == token).any()) for token in self.adapter.media_token_ids())

    def _live_cached(self, cache) -> _Cached | None:
        cached = None if cache is None else getattr(cache, CACHE_STATE_ATTRIBUTE, None)
        if isinstance(cached, _Cached) and cache.get_seq_length() == 0:
            delattr(cache, CACHE_STATE_ATTRIBUTE)  # an emptied cache (reset) starts over
            return None
        if not isinstance(cached, _Cached):
            return None
        past = cache.get_seq_length(cached.segments[0][0])
        if past < cached.segments[0][1].shape[1]:
            cached.drop_prefill_tail(cached.segments[0][1].shape[1] - past)
        return cached

    # ------------------------------------------------------------------ language model
    def _on_lm_call(self, module, args, kwargs):
        self._forward = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        batch, length = embeds.shape[:2]
        cache = _cache_of(kwargs)
        call = self._call or {}
        input_ids = call.get("input_ids")
        brings_media = _brings_media(call)
        if input_ids is None and brings_media:
            raise InputError(
                "vlm_prune finds the visual tokens by their token ids, and this call passes inputs_embeds "
                "with media but no input_ids; pass the processor's input_ids instead of inputs_embeds"
            )
        filled = cache is not None and cache.get_seq_length() > 0
        # on a filled cache, media token ids without media (e.g. prompt-lookup candidates copied from the
        # prompt) are plain tokens to the model, as they are to the unwrapped one
        media_here = input_ids is not None and self._has_media(input_ids) and (brings_media or not filled)
        if media_here and tuple(input_ids.shape) == (batch, length):
            if filled:
                raise InputError(
                    "media tokens arrived with a non-empty cache; vlm_prune prunes whole prefills only. "
                    f"Start a new cache for a prompt with new images or video. {SPLIT_MEDIA_HINT}"
                )
            return args, self._prefill(kwargs, input_ids, cache)
        cached = self._live_cached(cache)
        if cached is not None:
            return args, self._continue(kwargs, cached, cache)
        return None

    def _prefill(self, kwargs: dict, input_ids: torch.Tensor, cache) -> dict:
        embeds: torch.Tensor = kwargs["inputs_embeds"]
        device = embeds.device
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        elif not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            raise InputError("vlm_prune needs a 2-D attention mask (or none); a prepared 4-D mask cannot be pruned")
        rope = self.adapter.rope_positions(kwargs.get("position_ids"), batch, length, 0).to(device)
        media = self.adapter.sample_media(input_ids, self._call or {}, embeds)
        samples = [
            _Sample(
                media=m,
                original_counts=_counts_per_media(m.layout),
                present=torch.ones(len(m.visual_columns), dtype=torch.bool),
                layout=m.layout,
            )
            for m in media
        ]
        columns = torch.arange(length, device=device).expand(batch, -1).clone()
        stats = PruneStats(visual_tokens_in=sum(len(s.visual_columns) for s in samples))
        forward = _Forward(
            prefill=True,
            columns=columns,
            mask=mask,
            rope=rope,
            samples=samples,
            shift=torch.zeros(batch, dtype=torch.long, device=device),
            stats=stats,
            original_embeds=embeds,
        )
        self._forward = forward
        self._check_media_kinds(samples)

        pre_llm = [stage for stage in self.stages if stage.layer == 0]
        for stage in pre_llm:
            layouts = [sample.media.layout for sample in samples]
            signals = self._signals.tables(stage.needs, self._call or {}, layouts, forward.original_embeds)
            embeds = self._run_stage(stage, embeds, signals=signals)
        kwargs["inputs_embeds"] = embeds
        if pre_llm:
            kept_flat = torch.cat([s.present for s in samples])
            self.adapter.compact_lm_kwargs(kwargs, forward.columns, kept_flat)
        forward.segments = [(0, forward.columns.clone())]
        self._finish_lm_kwargs(kwargs, forward, past=0)
        return kwargs

    def _finish_lm_kwargs(self, kwargs: dict, forward: _Forward, past: int) -> None:
        """Set mask, contiguous position ids and the pending rotary positions for the language model."""
        batch, length = forward.columns.shape
        contiguous = torch.arange(past, past + length, device=forward.rope.device).expand(batch, -1)
        kwargs["attention_mask"] = forward.mask
        kwargs["position_ids"] = self.adapter.lm_position_ids(contiguous)
        self._pending_rope = forward.rope

    def _continue(self, kwargs: dict, cached: _Cached, cache) -> dict:
        embeds: torch.Tensor = kwargs["inputs_embeds"]
        device = embeds.device
        batch, q_len = embeds.shape[:2]
        first_layer, first_columns = cached.segments[0]
        past = cache.get_seq_length(first_layer)
        appended = past - first_columns.shape[1]
        virtual_past = cached.virtual_past(past)
        user_mask = kwargs.get("attention_mask")
        if user_mask is not None and user_mask.ndim != 2:
            raise InputError("after a pruned prefill, pass a 2-D attention mask (or none)")
        if user_mask is not None and user_mask.shape[1] != virtual_past + q_len:
            raise InputError(
                f"attention_mask spans {user_mask.shape[1]} tokens, but the unpruned sequence so far is "
                f"{virtual_past + q_len}; pass the mask over the ORIGINAL sequence, as generate() does"
            )

        def segment_mask(index: int) -> torch.Tensor:
            seg_columns = cached.segments[index][1]
            if user_mask is None:
                tail = torch.ones(batch, appended + q_len, dtype=cached.prefill_mask[index].dtype, device=device)
                return torch.cat([cached.prefill_mask[index], tail], dim=1)
            head = gather_tokens(user_mask.unsqueeze(-1), seg_columns.to(device)).squeeze(-1)
            return torch.cat([head, user_mask[:, cached.original_length :]], dim=1)

        rope = self.adapter.rope_positions(kwargs.get("position_ids"), batch, q_len, virtual_past).to(device)
        if self.position_policy == "compact":
            rope = rope - cached.shift.to(device).view(1, -1, 1)
        forward = _Forward(
            prefill=False,
            columns=torch.arange(q_len, device=device).expand(batch, -1),
            mask=segment_mask(0),
            rope=rope,
        )
        if len(cached.segments) > 1:
            from transformers.masking_utils import create_causal_mask

            bounds = [layer for layer, _ in cached.segments[1:]] + [len(self.adapter.layers)]
            for index, (layer, _) in enumerate(cached.segments[1:], start=1):
                mask = create_causal_mask(
                    config=self.adapter.text_config,
                    inputs_embeds=embeds,
                    attention_mask=segment_mask(index),
                    cache=cache,
                    position_ids=None,
                    layer_idx=layer,
                )
                for covered in range(layer, bounds[index]):
                    forward.layer_masks[covered] = mask
        self._forward = forward
        self._finish_lm_kwargs(kwargs, forward, past=past)
        return kwargs

    def _on_lm_return(self, module, args, kwargs, output):
        forward = self._forward
        self._pending_rope = None
        if forward is None or not forward.prefill:
            self._forward = None
            return None
        cache = output.get("cache") if hasattr(output, "get") else None
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        final_columns = forward.columns
        segments = forward.segments
        if cache is not None and self.trim_cache and len(segments) > 1:
            segments = trim_segments(cache, segments, final_columns, len(self.adapter.layers))  # engine/ragged.py
        stats = forward.stats
        stats.visual_tokens_out = sum(len(s.visual_columns) for s in forward.samples)
        self._finish_stats(stats, forward, cache, segments)
        self.stats = stats
        self.last_kept_index = final_columns
        self._kept_this_call = final_columns
        if cache is not None:
            prefill_masks = []
            for _, seg_columns in segments:
                seg_mask = (seg_columns >= 0).to(forward.mask.dtype)
                original_mask = self._prefill_mask_for(seg_columns, forward)
                prefill_masks.append(seg_mask * original_mask)
            state = _Cached(
                original_length=int(self._call["input_ids"].shape[1]),
                shift=forward.shift.clone(),
                segments=segments,
                prefill_mask=prefill_masks,
                tokens=self._call["input_ids"].detach().cpu(),
                position_state=self.adapter.position_state(),
            )
            setattr(cache, CACHE_STATE_ATTRIBUTE, state)
        self._forward = None
        return None

    def _prefill_mask_for(self, seg_columns: torch.Tensor, forward: _Forward) -> torch.Tensor:
        original = (self._call or {}).get("attention_mask")
        if original is None:
            return torch.ones_like(seg_columns, dtype=forward.mask.dtype)
        return gather_tokens(original.unsqueeze(-1), seg_columns.to(original.device)).squeeze(-1).to(forward.mask.dtype)

    def _finish_stats(self, stats: PruneStats, forward: _Forward, cache, segments) -> None:
        num_layers = len(self.adapter.layers)
        valid0 = (self._call or {}).get("attention_mask")
        batch, length0 = self._call["input_ids"].shape
        per_sample_len0 = valid0.sum(dim=1).tolist() if valid0 is not None else [length0] * batch
        # tokens per layer per sample: start from the unpruned count, subtract each stage's removals
        removed_before: dict[int, list[int]] = {}
        for stage_stats in stats.stages:
            removed = [sum(a) - sum(b) for a, b in zip(stage_stats.tokens_in, stage_stats.tokens_out)]
            previous = removed_before.get(stage_stats.layer, [0] * batch)
            removed_before[stage_stats.layer] = [p + r for p, r in zip(previous, removed)]
        flops_after = flops_before = 0
        visual_per_layer_total = 0.0
        for sample in range(batch):
            counts, current = [], per_sample_len0[sample]
            for layer in range(num_layers):
                current -= removed_before.get(layer, [0] * batch)[sample]
                counts.append(current)
            flops_after += self.shape.prefill_flops(counts)
            flops_before += self.shape.prefill_flops([per_sample_len0[sample]] * num_layers)
            visual_in = sum(len(c) for c in [forward.samples[sample].media.visual_columns])
            visual_per_layer_total += sum(visual_in - (per_sample_len0[sample] - n) for n in counts) / num_layers
        stats.prefill_flops = flops_after
        stats.prefill_flops_unpruned = flops_before
        stats.equivalent_average_tokens = visual_per_layer_total / max(batch, 1)
        stats.select_seconds = sum(stage.select_seconds for stage in stats.stages)
        if cache is not None:
            total = 0
            per_token_layer = 0
            for layer in cache.layers:
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                if keys is None or not isinstance(keys, torch.Tensor):
                    continue
                total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
                per_token_layer += (keys.numel() // max(keys.shape[-2], 1)) * keys.element_size() * 2
            stats.kv_cache_bytes = total
            stats.kv_cache_bytes_unpruned = per_token_layer * length0

    # ------------------------------------------------------------------ stages
    def _check_media_kinds(self, samples: list[_Sample]) -> None:
        has_video = any(bool((s.media.layout.kind == VIDEO).any()) for s in samples)
        for method in self.methods:
            if getattr(method, "media", "any") == "video" and not has_video:
                raise MediaKindError(
                    f"{type(method).__name__} prunes video, but this input holds only images; pass video inputs "
                    "or choose an image method (e.g. 'divprune', 'zoo' or 'fastv'; see vlm_prune.methods())"
                )

    def _run_stage(
        self,
        stage: Stage,
        hidden: torch.Tensor,
        *,
        signals: dict | None = None,
        attention: tuple | None = None,
    ) -> torch.Tensor:
        """Run one stage on the current slots; compact `hidden` and the forward state. Returns new hidden."""
        forward = self._forward
        batch, length = forward.columns.shape
        device = hidden.device
        started = time.perf_counter()
        keep_slots: list[torch.Tensor] = []
        replacements: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        tokens_in, tokens_out = [], []
        valid_all = forward.mask[:, -length:].bool()
        for row in range(batch):
            sample = forward.samples[row]
            row_columns = forward.columns[row]
            valid_slots = valid_all[row].nonzero(as_tuple=True)[0]
            # slots hold original columns in ascending order (engine padding -1 first), so a sorted search
            # finds the visual tokens still present
            visual_columns = sample.visual_columns.to(device)
            visual_slots = torch.searchsorted(row_columns, visual_columns).clamp(max=length - 1)
            layout = sample.layout
            current_counts = _counts_per_media(layout)
            tokens_in.append(current_counts)
            if len(visual_slots) == 0:
                keep_slots.append(torch.arange(length, device=device))
                replacements.append(None)
                tokens_out.append(current_counts)
                continue
            keep = stage.keep
            budgets = (
                None
                if keep is None
                else [tokens_to_keep(keep, o, c) for o, c in zip(sample.original_counts, current_counts)]
            )
            slot_to_valid = torch.full((length,), -1, dtype=torch.long, device=device)
            slot_to_valid[valid_slots] = torch.arange(len(valid_slots), device=device)
            visual_index = slot_to_valid[visual_slots]
            if bool(((visual_index < 0) | (row_columns[visual_slots] != visual_columns)).any()):
                raise InputError("visual tokens are masked out by the attention mask; check the inputs")
            ctx = SelectionContext(
                layer=stage.layer,
                num_visual=len(visual_slots),
                budget=None if budgets is None else sum(budgets),
                budget_per_media=budgets,
                visual_features=hidden[row, visual_slots],
                hidden_states=hidden[row, valid_slots],
                visual_index=visual_index,
                input_ids=self._row_input_ids(row, valid_slots),
                layout=layout,
                seed=self.seed,
            )
            if signals is not None:
                self._signals.fill(ctx, signals, row, sample.media.layout.kind[sample.present], sample.present)
            if attention is not None:
                ctx.attention_fn = stage_rows_fn(self.adapter.layers, *attention, row, valid_slots)
            ctx.segments_fn = segments_fn(
                self.adapter, self._call["input_ids"][row], row_columns[valid_slots], sample.media
            )
            result = stage.select(ctx)
            features = group = None
            if isinstance(result, Selection):
                rope_here = forward.rope[:, row, visual_slots]  # remembered for re-entry (engine/reentry.py)
                remember(forward.reentry, row, result, visual_columns, hidden[row, visual_slots], rope_here)
                features, group, result = result.features, result.group, result.keep_mask
            keep_mask = torch.as_tensor(result, device=device)
            if keep_mask.dtype != torch.bool or keep_mask.shape != (len(visual_slots),):
                raise PruneError(
                    f"{stage.name}.select returned {keep_mask.dtype} {tuple(keep_mask.shape)}; it must return a "
                    f"bool mask of shape ({len(visual_slots)},) (ctx.num_visual)"
                )
            keep_mask_cpu = keep_mask.cpu()  # the one copy to the host; counts come from it
            kept_count = int(keep_mask_cpu.sum())
            if budgets is not None and kept_count != sum(budgets):
                raise PruneError(f"{stage.name} kept {kept_count} tokens, its budget is {sum(budgets)}")
            slot_keep = torch.ones(length, dtype=torch.bool, device=device)
            slot_keep[visual_slots[~keep_mask]] = False
            kept_slots = slot_keep.nonzero(as_tuple=True)[0]
            keep_slots.append(kept_slots)
            if features is not None:
                target = torch.searchsorted(kept_slots, visual_slots[keep_mask])
                replacements.append((target, features))
            else:
                replacements.append(None)
            sample.present[sample.present.nonzero(as_tuple=True)[0][~keep_mask_cpu]] = False
            sample.layout = layout.select(keep_mask_cpu)
            if group is not None:
                sample.layout.group = torch.as_tensor(group).cpu().long()
            tokens_out.append(_counts_per_media(sample.layout))
            forward.shift[row] += len(visual_slots) - kept_count
            if self.position_policy == "compact":
                removed = torch.zeros(length, dtype=torch.long, device=device)
                removed[visual_slots[~keep_mask]] = 1
                forward.rope[:, row] -= torch.cumsum(removed, 0).to(forward.rope.dtype).view(1, -1)
        index = _left_pad(keep_slots, device)
        # one fused launch on CUDA (Triton), the torch reference elsewhere: hidden, columns, mask, rope
        compacted = compact_sequence(hidden, index, columns=forward.columns, mask=forward.mask, rope=forward.rope)
        hidden, forward.columns, forward.mask, forward.rope = compacted
        for row, replacement in enumerate(replacements):
            if replacement is not None:
                target, features = replacement
                offset = index.shape[1] - len(keep_slots[row])
                hidden[row, target + offset] = features.to(hidden.dtype)
        forward.stats.stages.append(
            StageStats(stage.name, stage.layer, tokens_in, tokens_out, time.perf_counter() - started)
        )
        return hidden

    def _row_input_ids(self, row: int, valid_slots: torch.Tensor) -> torch.Tensor:
        input_ids = self._call["input_ids"]
        columns = self._forward.columns[row, valid_slots].to(input_ids.device)
        return input_ids[row, columns.clamp(min=0)]

    # ------------------------------------------------------------------ decoder layers
    def _make_layer_hook(self, index: int):
        stages_here = [stage for stage in self.stages if stage.layer == index and index > 0]  # 0 = pre-LLM
        capture_for_next = any(stage.layer == index + 1 and "attention" in stage.needs for stage in self.stages)

        def hook(module, args, kwargs):
            forward = self._forward
            if forward is None:
                return None
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if forward.overrides is not None:
                kwargs.update(forward.overrides)
            if not forward.prefill and index in forward.layer_masks:
                kwargs["attention_mask"] = forward.layer_masks[index]
            if forward.prefill and stages_here:
                hidden = self._in_llm_stages(index, stages_here, hidden, kwargs)
            if capture_for_next and forward.prefill:
                forward.attention_input = (index, hidden, kwargs["position_embeddings"], _cache_of(kwargs))
            return (hidden, *rest), kwargs

        return hook

    def _in_llm_stages(self, index: int, stages: list[Stage], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        forward = self._forward
        cos, sin = kwargs["position_embeddings"]
        for stage in stages:
            attention = None
            if "attention" in stage.needs:
                if forward.attention_input is None or forward.attention_input[0] != index - 1:
                    raise PruneError(f"attention rows of layer {index - 1} were not recorded")
                attention = (forward.attention_input, (index, hidden, (cos, sin), None))  # layers k-1 and k
            if stage.reenter:  # the sequence grows back (engine/reentry.py)
                args = (self.adapter.rotary, self.adapter.rope_rows, stage.name, index, self.position_policy)
                hidden, (cos, sin) = reenter_tokens(forward, hidden, *args)
                continue
            before = forward.columns
            hidden = self._run_stage(stage, hidden, attention=attention)
            slot_index = _positions_within(before, forward.columns)
            if self.position_policy == "compact":
                with torch.no_grad():
                    rope = forward.rope[0] if self.adapter.rope_rows == 1 else forward.rope
                    cos, sin = self.adapter.rotary(hidden, rope)
            else:
                cos = gather_tokens(cos, slot_index)
                sin = gather_tokens(sin, slot_index)
        batch, length = forward.columns.shape
        cache = _cache_of(kwargs)
        contiguous = torch.arange(length, device=hidden.device).expand(batch, -1)
        mask = create_causal_mask(
            config=self.adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=forward.mask,
            cache=cache,
            position_ids=contiguous,
            layer_idx=index if cache is not None else None,
        )
        forward.overrides = {
            "attention_mask": mask,
            "position_embeddings": (cos, sin),
            "position_ids": contiguous,
        }
        kwargs.update(forward.overrides)
        forward.segments.append((index, forward.columns.clone()))
        return hidden

    # ------------------------------------------------------------------ rotary
    def _on_rotary(self, module, args, kwargs):
        rope = self._pending_rope
        if rope is None:
            return None
        self._pending_rope = None
        value = rope[0] if self.adapter.rope_rows == 1 else rope
        if len(args) >= 2:
            args = (args[0], value, *args[2:])
        else:
            kwargs["position_ids"] = value
        return args, kwargs


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is not None and not hasattr(cache, "layers"):
        raise AttentionImplementationError(
            f"cache of type {type(cache).__name__} is not supported; use transformers' DynamicCache (the default)"
        )
    if cache is not None and type(cache).__name__ in ("StaticCache", "HybridCache", "OffloadedStaticCache"):
        raise AttentionImplementationError(
            "static caches cannot hold pruned sequences of varying length; generate with the default "
            "DynamicCache (do not set cache_implementation='static')"
        )
    if cache is not None and any("Quantized" in type(layer).__name__ for layer in cache.layers):
        raise AttentionImplementationError(
            "quantized KV caches are not supported yet (the engine trims and maps cached positions, which "
            "quantized layers store packed); generate with the default DynamicCache (do not set "
            "cache_implementation='quantized')"
        )
    return cache


def _left_pad(rows: list[torch.Tensor], device) -> torch.Tensor:
    """Stack per-row index lists into (B, L_max), left-padded with -1."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for row, values in enumerate(rows):
        if len(values):
            out[row, width - len(values) :] = values
    return out


def _counts_per_media(layout: VisualLayout) -> list[int]:
    """Visual tokens of each media item in `layout` (one host sync)."""
    return torch.bincount(layout.media_index.cpu(), minlength=layout.num_media).tolist()


def _brings_media(call: dict) -> bool:
    """Whether the call carries media to encode or pre-encoded media features."""
    return any(
        call.get(key) is not None and len(call[key])
        for key in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
    )

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

Host work: every shape comes from a host mirror of the slots (`engine/batch.py`), advanced with batched ops
(no loop over rows outside the methods' own `select` calls). Device->host reads: ONE per prefill (token ids,
mask and media grids, packed) and ONE per stage (the keep masks); decode steps read nothing
(`tests/test_sync_count.py`, `engine/syncs.py`).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from vlm_prune.adapters.base import SPLIT_MEDIA_HINT, Adapter
from vlm_prune.adapters.media_plan import HOST_MEDIA, HostMedia
from vlm_prune.engine.aranges import SharedAranges
from vlm_prune.engine.batch import HostBatch, read_call, to_device
from vlm_prune.engine.cached import CACHE_STATE_ATTRIBUTE
from vlm_prune.engine.cached import CachedPrefill as _Cached
from vlm_prune.engine.calls import brings_media, cache_of, rope_view
from vlm_prune.engine.context import VIDEO
from vlm_prune.engine.continuation import continue_forward
from vlm_prune.engine.followup import cut_leading, resent_overlap
from vlm_prune.engine.forward_state import _Forward, _Sample
from vlm_prune.engine.labels import kept_labels, with_loss
from vlm_prune.engine.layer_hooks import LayerHooks
from vlm_prune.engine.masks import StageMasks
from vlm_prune.engine.ragged import trim_segments
from vlm_prune.engine.reentry import reenter_tokens
from vlm_prune.engine.signals import KEEP_RECORDINGS, SignalRecorder
from vlm_prune.engine.stage_run import run_stage
from vlm_prune.engine.stats import LayerShape, PruneStats, cache_bytes, finish_prefill_stats
from vlm_prune.errors import AttentionImplementationError, InputError, MediaKindError, PruneError
from vlm_prune.kernels import gather_many
from vlm_prune.methods.base import Stage

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
POSITION_POLICIES = ("preserve", "compact")
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index")
_CPU = torch.device("cpu")


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
        self._host_of: dict[int, torch.Tensor] = {}  # id of a device tensor of the call -> its host copy
        self.last_kept_index: torch.Tensor | None = None
        self._call: dict | None = None
        self._signals = SignalRecorder(adapter)
        self._stage_masks = StageMasks(adapter.text_config)
        self._vision_calls: list[object] = []
        self._forward: _Forward | None = None
        self._pending_rope: torch.Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._layers = LayerHooks(adapter.layers, {})  # decoder-layer hooks, attached per forward (in-LLM stages)
        self._removed = False
        self._labels: torch.Tensor | None = None
        self._loss_kwargs: dict = {}
        self._kept_this_call: torch.Tensor | None = None
        self._past = 0  # cached length of the current call's pruned cache (`_live_cached`)
        self._decode_columns: torch.Tensor | None = None  # (B, q) slots of a decode step, reused while shapes repeat
        self._plain_rope = type(adapter).rope_positions is Adapter.rope_positions
        # decode steps hand the rotary embedding the caller's 2-D position ids unchanged (`engine/continuation.py`)
        self._rotary_as_given = self._plain_rope and position_policy == "preserve" and adapter.rope_rows == 1
        self._aranges = SharedAranges()  # contiguous position ids (and plain rotary ones) are views of its buffers
        self._media_ids = np.asarray(adapter.media_token_ids(), dtype=np.int64)
        self._media_id_list = self._media_ids.tolist()
        self._num_layers = num_layers
        self._compacts_lm_kwargs = type(adapter).compact_lm_kwargs is not Adapter.compact_lm_kwargs
        self._pre_llm = [stage for stage in self.stages if stage.layer == 0]
        self._video_only = [method for method in self.methods if getattr(method, "media", "any") == "video"]
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    @property
    def stats(self) -> PruneStats:
        """`PruneStats` of the last prefill that held media (its FLOPs are counted here, off the hot path)."""
        if self._stats_todo is not None:
            todo, self._stats_todo = self._stats_todo, None
            todo()
        return self._stats

    @stats.setter
    def stats(self, value: PruneStats) -> None:
        self._stats, self._stats_todo = value, None

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
        if in_llm:  # attached per forward (`engine/layer_hooks.py`)
            first = min(in_llm)
            needs_rows = any("attention" in stage.needs for stage in self.stages)
            start = max(0, first - 1) if needs_rows else first
            hooks = {index: self._make_layer_hook(index) for index in range(start, len(self.adapter.layers))}
            self._layers = LayerHooks(self.adapter.layers, hooks)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before `apply()`.

        A cache filled while pruning still holds the pruned sequence: continue it only while a handle is
        applied to the model (any handle; the mapping travels with the cache), or start a new one.
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._layers.detach()
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
        labels = self._labels = kwargs.pop("labels", None)
        self._loss_kwargs = {} if labels is None else {key: kwargs[key] for key in _LOSS_KWARGS if key in kwargs}
        self._kept_this_call = None
        cache = cache_of(kwargs)
        cached = self._live_cached(cache)
        resent = cached is not None and self._follow_up(kwargs, cached, cache)
        result = self._on_model_call_inner(args, kwargs, cache, cached)
        return (args, kwargs) if (resent or self._labels is not None) and result is None else result

    def _follow_up(self, kwargs: dict, cached: _Cached, cache) -> bool:
        """A call on a pruned cache: cut what it re-sends (see `followup`) and record the tokens it adds.

        Returns whether it cut anything. Only a call longer than the pruned gap can re-send tokens; a decode step
        just appends its tokens to the record (a list, joined when a follow-up needs it).
        """
        if cached.tokens is None:
            return False
        past = self._past
        virtual_past = cached.virtual_past(past)
        input_ids = kwargs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            return False
        overlap = 0
        if input_ids.shape[1] > virtual_past - past > 0:
            recorded = cached.recorded(virtual_past)
            overlap = resent_overlap(input_ids, recorded, past, virtual_past, kwargs.get("attention_mask"))
            if overlap:
                cut_leading(kwargs, overlap, input_ids.shape[1])
        cached.add_tokens(kwargs["input_ids"], virtual_past)
        return bool(overlap)

    def _on_model_call_inner(self, args, kwargs, cache, cached: _Cached | None):
        """Record the call for the language-model hook; inject decode positions on a pruned cache."""
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        # asked once per forward; the language-model hook reuses them for the same cache
        brings = call["brings_media"] = brings_media(call)
        if brings and (call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None):
            # media is encoded inside this call: older recordings are stale
            self._signals.clear()
            self._vision_calls = []
        call["vision_calls"] = self._vision_calls
        self._call, self._host_of = call, {}
        filled = cached is not None or (cache is not None and cache.get_seq_length() > 0)
        call["live"] = (cache, cached, filled)
        if call.get("input_ids") is not None and (brings or not filled):  # a prefill: read it ONCE
            call["host"] = read_call(call)
            self._host_of = {id(call[key]): value for key, value in call["host"].items()}
        if brings:
            self.adapter.check_media_inputs(self._host_call())
        if cached is None or call.get("input_ids") is None or brings:
            return None
        input_ids, state = call["input_ids"], cached.position_state
        if call.get("position_ids") is not None:
            positions = self.adapter.follow_up_position_ids(call["position_ids"], state)
        else:
            virtual_past = cached.virtual_past(self._past)
            positions = self.adapter.decode_position_ids(call, virtual_past, *input_ids.shape[::-1], state)
        if positions is None:
            return None
        kwargs["position_ids"] = to_device(positions, input_ids.device)
        return args, kwargs

    def _on_model_return(self, module, args, output):
        self._layers.detach()  # (a no-op unless a language-model forward raised)
        labels, self._labels = self._labels, None
        if labels is not None:
            output = self._with_loss(output, labels)
        self._call, self._host_of = None, {}
        # generate(use_cache=False) re-runs the prefill from pre-encoded features without calling the
        # vision tower again, so the latest recordings are kept (bounded) rather than cleared.
        self._signals.trim()
        if len(self._vision_calls) > KEEP_RECORDINGS:
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

    def _host_call(self) -> dict:
        """The recorded call with the host copies of what `read_call` read (what adapters read on the host)."""
        call = self._call or {}
        return {**call, **call.get("host", {})}

    def _on_vision_call(self, module, args, kwargs):
        # the tower gets the call's own grids: hand the adapter their host copies (no second read)
        host = self._host_of
        args = tuple(host.get(id(value), value) for value in args)
        kwargs = {key: host.get(id(value), value) for key, value in kwargs.items()}
        self._vision_calls.append(self.adapter.record_vision_call(args, kwargs))

    def _has_media(self, input_ids: torch.Tensor) -> bool:
        """Whether (host) `input_ids` hold media tokens. With one or two media ids, the search is the adapter's own
        first step (`HostMedia`), kept on the call for its `sample_media` (one pass over the ids, not two)."""
        media = self._media_ids
        if len(media) > 2:  # (np.isin sorts: ~30 us warm, 6x two compares)
            return bool(np.isin(input_ids.numpy(), media).any())
        found = HostMedia(input_ids, self._media_id_list)
        if self._call is not None:
            self._call[HOST_MEDIA] = found
        return found.total > 0

    def _live_cached(self, cache) -> _Cached | None:
        """The pruned prefill state riding on `cache`, if any; sets `_past`, the cached length of its first layers
        (segment 0 starts at layer 0), which the rest of the call reuses."""
        cached = None if cache is None else getattr(cache, CACHE_STATE_ATTRIBUTE, None)
        if not isinstance(cached, _Cached):
            return None
        past = self._past = cache.get_seq_length()
        if past == 0:
            delattr(cache, CACHE_STATE_ATTRIBUTE)  # an emptied cache (reset) starts over
            return None
        if past < cached.segments[0][1].shape[1]:
            cached.drop_prefill_tail(cached.segments[0][1].shape[1] - past)
        return cached

    # ------------------------------------------------------------------ language model
    def _on_lm_call(self, module, args, kwargs):
        self._forward = None
        self._layers.detach()  # (a no-op unless a forward raised)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        call = self._call or {}
        brings = call["brings_media"] if "brings_media" in call else brings_media(call)
        live = call.get("live")
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        if live is None or live[0] is not cache:  # the language model got another cache than the call
            cache = cache_of(kwargs)  # (the call's own cache was checked by the top-level hook)
            live = (cache, None, cache is not None and cache.get_seq_length() > 0)
            live = (cache, self._live_cached(cache) if live[2] else None, live[2])
        # on a filled cache, media token ids without media (e.g. prompt-lookup candidates copied from the
        # prompt) are plain tokens to the model, as they are to the unwrapped one; decode steps (no host read) skip
        host_ids = call.get("host", {}).get("input_ids")  # (read only when the call has input_ids)
        if host_ids is None and brings:
            raise InputError(
                "vlm_prune finds the visual tokens by their token ids, and this call passes inputs_embeds "
                "with media but no input_ids; pass the processor's input_ids instead of inputs_embeds"
            )
        if host_ids is not None and (brings or not live[2]) and self._has_media(host_ids):
            input_ids = call["input_ids"]
            if tuple(input_ids.shape) == tuple(embeds.shape[:2]):
                if live[2]:
                    raise InputError(
                        "media tokens arrived with a non-empty cache; vlm_prune prunes whole prefills only. "
                        f"Start a new cache for a prompt with new images or video. {SPLIT_MEDIA_HINT}"
                    )
                return args, self._prefill(kwargs, input_ids, cache)
        cached = live[1]
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
        positions = kwargs.get("position_ids")
        rope, rows = None, self.adapter.rope_rows
        if self._plain_rope and positions is None:  # (views: the engine replaces `forward.rope`, never writes it)
            rope = self._aranges.rope(length, batch, rows, device)
        elif self._plain_rope:
            rope = rope_view(positions, rows, device)
        if rope is None:
            rope = to_device(self.adapter.rope_positions(positions, batch, length, 0), device)
        call = self._host_call()  # the host copies read once in `_on_model_call_inner`
        media = self.adapter.sample_media(call["input_ids"], call, embeds)
        host_mask = call.get("attention_mask") if mask is (self._call or {}).get("attention_mask") else None
        if host_mask is None and kwargs.get("attention_mask") is not None:
            host_mask = mask.cpu()  # a mask the language model got but the call did not (one more read)
        host_mask = None if host_mask is None else host_mask.numpy()
        all_valid = host_mask is None or bool(np.count_nonzero(host_mask) == host_mask.size)  # (no padding: as b1)
        valid = self._aranges.all_true(batch, length) if all_valid else host_mask != 0  # (host)
        # (views of shared buffers: the mirror replaces them, never writes them)
        host_columns, host_array = self._aranges.host_positions(length, batch)
        host = HostBatch(host_columns, valid, media, columns_are_slots=True, arrays=(host_array, all_valid))
        samples = [_Sample(m, host.original_counts[row], host, row) for row, m in enumerate(media)]
        columns = host_columns if device.type == "cpu" else torch.arange(length, device=device).expand(batch, -1)
        stats = PruneStats.of_prefill(len(host.rows))
        forward = _Forward.start_prefill(
            columns=columns,
            mask=mask,
            rope=rope,
            samples=samples,
            shift=[0] * batch,
            host=host,
            stats=stats,
            original_embeds=embeds,
        )
        forward.mask_is_call_mask = kwargs.get("attention_mask") is (self._call or {}).get("attention_mask")
        self._forward = forward
        if self._layers.hooks:  # in-LLM stages: their layers' hooks, for this forward
            self._layers.attach()
        self._check_media_kinds(host)

        for stage in self._pre_llm:
            signals = None if not stage.needs else self._signals.tables(
                stage.needs, call, [sample.media.layout for sample in samples], forward.original_embeds)
            embeds = self._run_stage(stage, embeds, signals=signals)
        kwargs["inputs_embeds"] = embeds
        if self._pre_llm and self._compacts_lm_kwargs:  # (only families with such kwargs: Qwen3-VL's deepstack)
            self.adapter.compact_lm_kwargs(kwargs, forward.columns, host.present)  # row-major over the batch
        forward.segments, forward.host_segments = [(0, forward.columns)], [forward.host.columns]
        host.mark_segment()
        self._finish_lm_kwargs(kwargs, forward, past=0)
        return kwargs

    def _finish_lm_kwargs(self, kwargs: dict, forward: _Forward, past: int, rotary=None) -> None:
        """Set mask, contiguous position ids and the pending rotary positions (`rotary`, if given: what the
        rotary embedding gets, already in its layout) for the language model."""
        batch, length = forward.columns.shape
        contiguous = self._aranges.positions(past, length, batch, forward.rope.device)
        kwargs["attention_mask"] = forward.mask
        kwargs["position_ids"] = self.adapter.lm_position_ids(contiguous)
        if rotary is None:
            rotary = forward.rope[0] if self.adapter.rope_rows == 1 else forward.rope
        self._pending_rope = rotary

    def _continue(self, kwargs: dict, cached: _Cached, cache) -> dict:
        """A call on a pruned cache (a decode step, a later turn): its mask and positions (`engine/continuation.py`)."""
        forward, rotary = continue_forward(kwargs, cached, cache, self._past, self.adapter, self.position_policy,
                                           self._rotary_as_given, self._plain_rope, self._decode_columns)  # fmt: skip
        self._decode_columns = forward.columns
        self._forward = forward
        if forward.layer_masks:  # a ragged cache: its segments' layers get their masks
            self._layers.attach(forward.layer_masks)
        self._finish_lm_kwargs(kwargs, forward, past=self._past, rotary=rotary)
        return kwargs

    def _on_lm_return(self, module, args, kwargs, output):
        self._layers.detach()
        forward = self._forward
        self._pending_rope = None
        if forward is None or not forward.prefill:
            self._forward = None
            return None
        cache = output.get("cache") if hasattr(output, "get") else None
        if cache is None and "cache" not in getattr(output, "__dataclass_fields__", {}):  # older 5.x: no `cache` field
            cache = getattr(output, "past_key_values", None)
        final_columns, segments, host = forward.columns, forward.segments, forward.host
        if cache is not None and self.trim_cache and len(segments) > 1:  # engine/ragged.py, decided on the host
            mirrors, within = (forward.host_segments, host.columns), host.within_unread
            segments = trim_segments(cache, segments, final_columns, len(self.adapter.layers), mirrors, within)
        stats, length0 = forward.stats, self._call["input_ids"].shape[1]
        if cache is not None:
            stats.kv_cache_bytes, stats.kv_cache_bytes_unpruned = cache_bytes(cache, length0)
        mask0 = self._call.get("host", {}).get("attention_mask", self._call.get("attention_mask"))
        self._stats = stats  # (the rest when read: `stats`; the mirror's counts are replaced, never written)
        self._stats_todo = partial(finish_prefill_stats, stats, self.shape, self._num_layers, mask0, length0,
                                   host.offsets, host.current_counts)  # fmt: skip
        self.last_kept_index = final_columns
        self._kept_this_call = final_columns
        if cache is not None:
            masks = (forward.mask, forward.mask_is_call_mask, self._call.get("attention_mask"))
            mirror = (host.columns, host.all_valid, host.has_pad_slots)
            state = _Cached.after_prefill(segments, final_columns, mirror, masks, length0, forward.shift,
                                          self._call["input_ids"], self.adapter.position_state())  # fmt: skip
            setattr(cache, CACHE_STATE_ATTRIBUTE, state)
        self._forward = None
        return None

    # ------------------------------------------------------------------ stages
    def _check_media_kinds(self, host: HostBatch) -> None:
        video_only = self._video_only
        has_video = bool(video_only) and bool((host.kind == VIDEO).any())
        for method in video_only:
            if not has_video:
                raise MediaKindError(
                    f"{type(method).__name__} prunes video, but this input holds only images; pass video inputs "
                    "or choose an image method (e.g. 'divprune', 'zoo' or 'fastv'; see vlm_prune.methods())"
                )

    def _run_stage(self, stage: Stage, hidden: torch.Tensor, *, signals=None, attention=None) -> torch.Tensor:
        """One stage on the current slots (`engine/stage_run.py`); returns the compacted hidden states."""
        return run_stage(self._forward, stage, hidden, call=self._call, adapter=self.adapter, seed=self.seed,
                         position_policy=self.position_policy, signals=signals, recorder=self._signals,
                         attention=attention)  # fmt: skip

    # ------------------------------------------------------------------ decoder layers
    def _make_layer_hook(self, index: int):
        stages_here = [stage for stage in self.stages if stage.layer == index and index > 0]  # 0 = pre-LLM
        capture_for_next = any(stage.layer == index + 1 and "attention" in stage.needs for stage in self.stages)

        def hook(module, args, kwargs):
            forward = self._forward
            if forward is None or not (forward.prefill or index in forward.layer_masks):
                return None  # decode on a uniform cache: nothing to change
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
                forward.attention_input = (index, hidden, kwargs["position_embeddings"], cache_of(kwargs))
            return (hidden, *rest), kwargs

        return hook

    def _in_llm_stages(self, index: int, stages: list[Stage], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
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
                length = forward.columns.shape[1]
                both = torch.stack([forward.columns, forward.mask[:, -length:].to(forward.columns.dtype)]).cpu()
                forward.host.refresh(both[0], both[1] != 0)  # the grown slots, in one read
                continue
            hidden = self._run_stage(stage, hidden, attention=attention)
            slot_index = forward.index
            if slot_index is None:  # nothing removed: the position embeddings stay
                continue
            if self.position_policy == "compact":
                with torch.no_grad():
                    rope = forward.rope[0] if self.adapter.rope_rows == 1 else forward.rope
                    cos, sin = self.adapter.rotary(hidden, rope)
            else:
                cos, sin = gather_many((cos, sin), forward.host.gather_index(slot_index), padded=False)  # pads unread
        batch, length = forward.columns.shape
        cache = cache_of(kwargs)
        contiguous = self._aranges.positions(0, length, batch, hidden.device)
        # decided on the host mirror, so that transformers need not read the mask to skip it
        plain = forward.mask.shape[1] == length and forward.host.all_valid
        layer_idx = index if cache is not None else None
        mask = self._stage_masks.build(hidden, forward.mask, cache, contiguous, layer_idx, plain)  # engine/masks.py
        forward.overrides = {
            "attention_mask": mask,
            "position_embeddings": (cos, sin),
            "position_ids": contiguous,
        }
        kwargs.update(forward.overrides)
        forward.segments.append((index, forward.columns))
        forward.host_segments.append(forward.host.columns)
        forward.host.mark_segment()
        return hidden

    # ------------------------------------------------------------------ rotary
    def _on_rotary(self, module, args, kwargs):
        rope = self._pending_rope
        if rope is None:
            return None
        self._pending_rope = None
        if len(args) >= 2:
            args = (args[0], rope, *args[2:])
        else:
            kwargs["position_ids"] = rope
        return args, kwargs

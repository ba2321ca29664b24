"""The public entry points: `apply`, `pruned`, `methods`, `supported_models`."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from vlm_prune.adapters import adapter_for
from vlm_prune.adapters import supported_models as _supported_models
from vlm_prune.engine.budget import split_keep, validate_keep
from vlm_prune.engine.handle import PruneHandle
from vlm_prune.errors import BudgetError, PruneError
from vlm_prune.methods.base import Method, ScorerMethod

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruneHandle] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelInfo:
    """What `Method.bind(info)` learns about the model before its stages are built."""

    family: str
    num_layers: int
    name_or_path: str


def _build_methods(method: str | Method | list[Method], keep, options: dict) -> list[Method]:
    from vlm_prune.methods.registry import get_methods

    if isinstance(method, str):
        built = get_methods(method, **options)
    elif isinstance(method, Method):
        if options:
            raise PruneError(f"options {sorted(options)} apply to named methods; set them on your instance instead")
        built = [copy.copy(method)]
    elif isinstance(method, (list, tuple)) and all(isinstance(m, Method) for m in method):
        built = [copy.copy(m) for m in method]
    else:
        raise PruneError(
            f"method must be a name (see vlm_prune.methods()), an 'a+b' composition or a vlm_prune.Method "
            f"instance; got {type(method).__name__}"
        )
    budgets = split_keep(keep, len(built))
    for instance, budget in zip(built, budgets):
        if budget is not None:
            instance.keep = budget
    return built


def _check_budgets(method: Method, stages: list, named: bool) -> None:
    """Built-in methods (and scorers) need a budget at every stage; a user mask may decide alone."""
    if (named or isinstance(method, ScorerMethod)) and any(
        stage.keep is None and not stage.counts_itself for stage in stages
    ):
        raise BudgetError(
            f"{type(method).__name__} needs a budget: pass keep=0.25 (a fraction of the visual tokens) "
            "or keep=64 (tokens per image)"
        )


def apply(
    model: nn.Module,
    method: str | Method | list[Method],
    keep: float | int | None = None,
    *,
    position_policy: str = "preserve",
    trim_cache: bool = True,
    seed: int = 0,
    **options,
) -> PruneHandle:
    """Prune visual tokens of `model` (this instance only) with `method` until `handle.remove()`.

    Args:
        model: a supported Hugging Face VLM (see `supported_models()`), e.g. loaded with
            `AutoModelForImageTextToText.from_pretrained(...)`.
        method: a name from `methods()`, a "+"-joined composition (pre-LLM first, then in-LLM), or a
            `vlm_prune.Method` instance.
        keep: fraction of visual tokens to keep, in (0, 1], or an int count per media item. A composition
            splits a fraction geometrically across its parts. None = each method's default.
        position_policy: "preserve" (kept tokens keep their original RoPE / M-RoPE positions; decoding
            continues from the unpruned length) or "compact" (renumber contiguously).
        trim_cache: after prefill, trim the caches of layers below an in-LLM stage to the kept tokens.
        seed: seed of any randomness in the methods.
        **options: hyperparameters of the named method(s), e.g. `layer=3` for fastv.

    Returns:
        a `PruneHandle`: `.stats`, `.remove()`, usable as a context manager.

    The wrapped model takes what the unwrapped one takes: batches with any padding, `generate()` with beams,
    `num_return_sequences` or a `prefill_chunk_size` that leaves the media in the first chunk, a second turn
    on the same cache, and `labels` over the original `input_ids` (the loss covers the kept positions). Its
    prefill logits cover the kept positions; `handle.last_kept_index` maps them to input columns.
    """
    if not isinstance(model, nn.Module):
        raise PruneError(f"apply() needs a torch model, got {type(model).__name__}")
    existing = _ACTIVE.get(model)
    if existing is not None and not existing._removed:
        raise PruneError("this model is already pruned by another handle; call handle.remove() first")
    keep = validate_keep(keep)
    adapter = adapter_for(model)
    built = _build_methods(method, keep, options)
    info = ModelInfo(
        family=adapter.family,
        num_layers=len(adapter.layers),
        name_or_path=str(getattr(model.config, "_name_or_path", "") or ""),
    )
    stages = []
    for instance in built:
        bind = getattr(instance, "bind", None)
        if callable(bind):
            bind(info)
        instance_stages = instance.stages()
        _check_budgets(instance, instance_stages, named=isinstance(method, str))
        stages.extend(instance_stages)
    handle = PruneHandle(
        model, adapter, stages, position_policy=position_policy, trim_cache=trim_cache, seed=seed, methods=built
    )
    _ACTIVE[model] = handle
    return handle


@contextlib.contextmanager
def pruned(model: nn.Module, method: str | Method | list[Method], keep=None, **options) -> Iterator[PruneHandle]:
    """`apply()` as a context manager: the hooks come off when the block ends, even on an exception."""
    handle = apply(model, method, keep, **options)
    try:
        yield handle
    finally:
        handle.remove()


def methods() -> dict[str, str]:
    """Registered method names -> one-line summary."""
    from vlm_prune.methods.registry import available

    return available()


def supported_models() -> dict[str, str]:
    """Supported model classes -> family."""
    return _supported_models()

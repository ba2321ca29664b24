"""Count the device->host syncs a handle's hooks make, on any machine (a diagnostic for tests and benchmarks).

On an accelerator every host read of a device value stalls the host until the device queue drains: `.item()`,
`.tolist()`, `.cpu()`, `.numpy()`, `bool(t)`, `int(t)`, `float(t)`, `t.__index__()`, and the ops whose output
shape depends on the values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`,
`torch.equal`, `repeat_interleave` with tensor repeats). A CPU has no queue, so `SyncCounter` simulates one:

* `on_device(inputs)` marks the model's inputs as device tensors (`OnDevice`, a tensor subclass that every
  torch op propagates to its outputs, so the embeddings, hidden states, caches and everything the engine
  derives from them stay marked). `.cpu()` of a marked tensor returns an unmarked one: the host copy.
* `SyncCounter(handle)` wraps the handle's own hooks for the duration of a `with` block (per instance; the hook
  entries and the stages' `select` are always restored on exit) and records every sync-making call on a
  marked tensor made inside a hook, except inside a method's `select` (the method's own cost, not the engine's).

Host bookkeeping the engine builds from values it already read (plain CPU tensors) is not marked, just as on a
GPU it does not live on the device. Tensors the engine creates with `device=` are not marked either until they
meet a marked one, so the count is a lower bound; on a GPU, `torch.cuda.set_sync_debug_mode("error")`
(`benchmarks/gpu_check.sh`) is the exact check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_ACTIVE: list[SyncCounter] = []  # counters inside a `with` block, innermost last

_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.bincount,
    torch.bincount,
    torch.equal,
    torch.Tensor.equal,
    torch.allclose,
    torch.Tensor.allclose,
    torch.argwhere,
}
_REPEAT = {torch.Tensor.repeat_interleave, torch.repeat_interleave}
_INDEX = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _has_bool_index(index) -> bool:
    """A boolean DEVICE mask among the indices (a host mask is resolved on the host: no device read)."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, OnDevice) and item.dtype == torch.bool for item in items)


def _is_sync(func, args, kwargs) -> bool:
    if func in _READS:
        return True
    if func in _REPEAT:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if func in _INDEX and len(args) > 1 and _has_bool_index(args[1]):
        # x[mask] = number is a masked_fill (no sync); x[mask] and x[mask] = tensor need the count
        return not (func is torch.Tensor.__setitem__ and len(args) > 2 and isinstance(args[2], (int, float, bool)))
    if func is torch.where and len(args) == 1 and not kwargs:
        return True
    return False


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the accelerator (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _ACTIVE and _is_sync(func, args, kwargs):
            _ACTIVE[-1]._record(getattr(func, "__name__", str(func)))
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        return super().__torch_function__(func, types, args, kwargs)


def on_device(value):
    """`value` with every tensor in it (dicts, lists, tuples) marked as a device tensor."""
    if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice):
        return value.as_subclass(OnDevice)
    if isinstance(value, dict):
        return {key: on_device(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(item) for item in value)
    return value


@dataclass
class Sync:
    """One counted sync: the call and where in vlm_prune it was made (file:line, innermost vlm_prune frame)."""

    call: str
    where: str


@dataclass
class SyncCounter:
    """Count the syncs a handle's hooks make (see the module docstring). Use as a context manager:

        with SyncCounter(handle) as counter:
            model(**on_device(inputs))
        counter.count, counter.syncs   # how many, and where
    """

    handle: object
    syncs: list[Sync] = field(default_factory=list)
    _depth: int = 0
    _paused: int = 0
    _restore: list[Callable[[], None]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.syncs)

    def reset(self) -> None:
        self.syncs = []

    def _record(self, call: str) -> None:
        if self._depth and not self._paused:
            self.syncs.append(Sync(call, _where()))

    def _wrap(self, fn: Callable, pause: bool) -> Callable:
        def wrapper(*args, **kwargs):
            if pause:
                self._paused += 1
            else:
                self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                if pause:
                    self._paused -= 1
                else:
                    self._depth -= 1

        return wrapper

    def __enter__(self) -> SyncCounter:
        try:
            for hook in self.handle._hooks:
                hooks = hook.hooks_dict_ref()
                if hooks is None or hook.id not in hooks:
                    continue
                original = hooks[hook.id]
                hooks[hook.id] = self._wrap(original, pause=False)
                self._restore.append(lambda hooks=hooks, key=hook.id, fn=original: hooks.__setitem__(key, fn))
            layer_hooks = self.handle._layers.hooks  # attached per forward: the entries are what gets registered
            for index, original in list(layer_hooks.items()):
                layer_hooks[index] = self._wrap(original, pause=False)
                self._restore.append(lambda index=index, fn=original: layer_hooks.__setitem__(index, fn))
            for stage in self.handle.stages:  # (the method's own selection: not the engine's syncs)
                for name in ("select", "select_batch"):
                    original = getattr(stage, name)
                    if original is not None:
                        setattr(stage, name, self._wrap(original, pause=True))
                        self._restore.append(lambda stage=stage, name=name, fn=original: setattr(stage, name, fn))
            _ACTIVE.append(self)
        except BaseException:
            self._undo()
            raise
        return self

    def _undo(self) -> None:
        while self._restore:
            self._restore.pop()()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __exit__(self, *exc) -> None:
        self._undo()


def _where() -> str:
    frame = sys._getframe(2)
    here = __file__
    while frame is not None:
        name = frame.f_code.co_filename
        if "vlm_prune" in name and name != here:
            return f"{name.rsplit('vlm_prune', 1)[-1].lstrip('/')}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class CudaSyncCounter(SyncCounter):
    """The exact count on a GPU: `torch.cuda.set_sync_debug_mode("warn")` only while a hook of the handle runs
    (outside the methods' `select`), every synchronizing CUDA call it reports recorded as a `Sync` (`where` is
    the Python line that made it). The model's own syncs (outside the hooks) are not counted."""

    def _wrap(self, fn: Callable, pause: bool) -> Callable:
        def wrapper(*args, **kwargs):
            outer = self._depth > 0 and not self._paused
            if pause:
                self._paused += 1
            else:
                self._depth += 1
            torch.cuda.set_sync_debug_mode("warn" if self._depth and not self._paused else "default")
            try:
                return fn(*args, **kwargs)
            finally:
                if pause:
                    self._paused -= 1
                else:
                    self._depth -= 1
                torch.cuda.set_sync_debug_mode("warn" if outer else "default")

        return wrapper

    def __enter__(self) -> CudaSyncCounter:
        import warnings

        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        try:
            super().__enter__()
        except BaseException:
            self._warnings.__exit__(None, None, None)
            raise
        return self

    def collect(self) -> None:
        """Move the synchronizing-call warnings caught so far into `syncs`."""
        for warning in self._caught:
            if "synchroniz" in str(warning.message):
                where = f"{warning.filename}:{warning.lineno}"
                self.syncs.append(Sync(str(warning.message).split("\n")[0][:80], where))
        self._caught.clear()

    @property
    def count(self) -> int:
        if getattr(self, "_caught", None) is not None:
            self.collect()
        return len(self.syncs)

    def __exit__(self, *exc) -> None:
        try:
            torch.cuda.set_sync_debug_mode("default")
            self.collect()
        finally:
            super().__exit__(*exc)
            self._warnings.__exit__(None, None, None)

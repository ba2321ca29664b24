"""The method registry: names -> `Method` classes, with a one-line summary each.

Method modules register themselves at import (`register("fastv", FastV, "...")`); importing
`vlm_prune.methods` imports every built-in method module, so the registry is complete as soon as
any of it is used. Names are case-insensitive. A composition such as ``"evs+fastv"`` is parsed
into its parts with `parse_spec` and built with `get_methods`; the engine chains the stages.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from vlm_prune.errors import UnknownMethodError
from vlm_prune.methods.base import Method

_REGISTRY: dict[str, tuple[type[Method], str]] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _ident(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def register(name: str, cls: type[Method], summary: str) -> type[Method]:
    """Register `cls` under `name` with a one-line `summary`; returns `cls` (usable as a helper).

    Re-registering the same class under the same name is a no-op (module reloads); registering a
    different class under a taken name raises ValueError.
    """
    key = _normalise(name)
    if not key or "+" in key:
        raise ValueError(f"invalid method name {name!r}: it must be non-empty and must not contain '+'")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register({name!r}, ...) needs a vlm_prune.Method subclass, got {cls!r}")
    known = _REGISTRY.get(key)
    if known is not None and _ident(known[0]) != _ident(cls):
        raise ValueError(f"method name {key!r} is already registered to {known[0].__qualname__}")
    _REGISTRY[key] = (cls, " ".join(summary.split()))
    return cls


def available() -> dict[str, str]:
    """Registered names (sorted) -> one-line summary."""
    _ensure_builtins()
    return {name: summary for name, (_, summary) in sorted(_REGISTRY.items())}


def _lookup(name: str) -> type[Method]:
    _ensure_builtins()
    key = _normalise(name)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownMethodError(f"unknown pruning method {name!r}; known methods: {known}")
    return _REGISTRY[key][0]


def parse_spec(spec: str) -> list[str]:
    """``"evs+fastv"`` -> ``["evs", "fastv"]`` (normalised, each checked against the registry)."""
    parts = [_normalise(part) for part in spec.split("+")]
    if not spec.strip() or any(not part for part in parts):
        raise UnknownMethodError(
            f"cannot parse method spec {spec!r}: use a name or names joined by '+', "
            f"from: {', '.join(sorted(available()))}"
        )
    for part in parts:
        _lookup(part)
    return parts


def _accepted_kwargs(cls: type[Method]) -> set[str] | None:
    """Keyword arguments the constructor accepts, or None when it takes **kwargs."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_method(name: str, **kwargs: Any) -> Method:
    """Instantiate the method registered as `name` with `kwargs` (its dataclass fields).

    A ``"+"`` composition is refused here: use `get_methods`. Unknown names raise
    `UnknownMethodError` listing the known ones; unknown keyword arguments raise TypeError listing
    the accepted ones.
    """
    if "+" in name:
        raise ValueError(f"{name!r} is a composition: use get_methods({name!r}, ...) to build its parts")
    cls = _lookup(name)
    accepted = _accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"method {_normalise(name)!r} got unknown option(s) {unknown}; it accepts: {sorted(accepted)}"
            )
    return cls(**kwargs)


def get_methods(spec: str, **kwargs: Any) -> list[Method]:
    """Build every part of a ``"a+b"`` composition (or one name) in order.

    Each keyword argument goes to every part that accepts it; one that no part accepts raises
    TypeError. (How a shared `keep` is split across stages is the engine's business.)
    """
    names = parse_spec(spec)
    classes = [_lookup(n) for n in names]
    accepted = [_accepted_kwargs(c) for c in classes]
    if all(a is not None for a in accepted):
        everything = set().union(*accepted)  # type: ignore[arg-type]
        unknown = sorted(set(kwargs) - everything)
        if unknown:
            raise TypeError(f"no method in {spec!r} accepts option(s) {unknown}")
    return [
        cls(**{k: v for k, v in kwargs.items() if acc is None or k in acc})
        for cls, acc in zip(classes, accepted, strict=True)
    ]


def _ensure_builtins() -> None:
    # Importing the package imports (and so registers) every built-in method module.
    import vlm_prune.methods  # noqa: F401

"""Dataclass instances made without their generated `__init__`, for the records the hooks build every forward.

A dataclass `__init__` runs one line per field; in the hooks, cold after the model's layers, each line costs about
a microsecond, so a 12-field record costs ~10 us per stage. `fresh(cls, values)` gives the same instance (`==` to
`cls(**values)`: `tests/test_engine_host.py` checks each record the engine makes this way) from one dict the caller
spells out, every field included; `defaults(cls)` is the dict of the fields' plain defaults to start it from (the
fields with factories must be given: a factory is a call per field).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")


def defaults(cls: type) -> dict:
    """{field: default} of the fields of dataclass `cls` that have a plain default (read once, at import)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def factories(cls: type) -> set[str]:
    """The fields of dataclass `cls` whose default comes from a factory (the callers of `fresh` give them)."""
    return {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}


def fresh(cls: type[T], values: dict) -> T:
    """An instance of dataclass `cls` (no `__post_init__`) whose fields are `values` (a new dict, kept as is)."""
    record = object.__new__(cls)
    record.__dict__ = values
    return record

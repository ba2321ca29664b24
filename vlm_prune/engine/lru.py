"""A small least-recently-used map for the engine's per-signature host structures (layouts, index tensors).

Keys are plain hashable tuples (shapes, media grids, token counts); values are what is expensive to rebuild on
the host for every forward. Each adapter or handle owns its own instance, so the entries go away with it.
Values must not be mutated by their users (hand out copies of mutable containers).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


class SmallLRU(Generic[V]):
    """At most `size` entries; the least recently used one is dropped first."""

    def __init__(self, size: int = 32):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._items: dict[Hashable, V] = {}
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value stored for `key`, built with `build()` (and stored) on a miss."""
        items = self._items
        value = items.pop(key, _MISSING)  # (a plain dict keeps insertion order: re-inserting makes it the newest)
        if value is not _MISSING:
            items[key] = value
            self.hits += 1
            return value
        self.misses += 1
        value = items[key] = build()
        if len(items) > self.size:
            del items[next(iter(items))]  # the least recently used: the oldest insertion
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

"""Decoder-layer hooks attached for the one forward that needs them, not for every forward.

An in-LLM stage at layer k changes the sequence, so every later layer must get the compacted mask, position
embeddings and ids (the decoder loop hands every layer the same locals). Those hooks are needed in a prefill with
media, and in a decode step only on a ragged cache (segments whose layers hold different slots, `engine/ragged.py`).
Registered permanently, each of them would run on every decode step of every generation and return at once: on a
32-layer model with a stage at layer 2, ~30 calls per token for nothing. So the handle attaches them from the
language model's pre-hook when the forward needs them and detaches them when it returns (or, after an error, at
the next forward or `remove()`).

`hooks` holds the functions by layer index; `attach` registers what `hooks` holds at that moment, so a diagnostic
that wraps them (the sync counter, the benchmarks' timers) wraps the entries of `hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn


class LayerHooks:
    """Forward pre-hooks (with kwargs) on some decoder layers, attached per forward."""

    def __init__(self, layers: Sequence[nn.Module], hooks: dict[int, Callable]) -> None:
        self.layers = list(layers)  # (a list: ModuleList indexing runs Python per layer, every prefill)
        self.hooks = hooks  # layer index -> hook(module, args, kwargs)
        self._attached: list = []  # RemovableHandle of every attached hook

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def attach(self, indices: Iterable[int] | None = None) -> None:
        """Register the hooks of `indices` (default: every layer in `hooks`) in place of any attached ones."""
        self.detach()
        chosen = self.hooks if indices is None else [index for index in sorted(set(indices)) if index in self.hooks]
        add = self._attached.append
        for index in chosen:
            add(self.layers[index].register_forward_pre_hook(self.hooks[index], with_kwargs=True))

    def detach(self) -> None:
        """Remove every attached hook (a no-op when none is)."""
        if self._attached:
            for handle in self._attached:
                handle.remove()
            self._attached.clear()

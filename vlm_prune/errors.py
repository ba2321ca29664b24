"""The `PruneError` family: every error says what went wrong and what to do about it."""

from __future__ import annotations


class PruneError(Exception):
    """Base class of every error raised by vlm_prune."""


class UnsupportedModelError(PruneError, TypeError):
    """The model is not a family vlm_prune has an adapter for."""


class BudgetError(PruneError, ValueError):
    """`keep` is not a fraction in (0, 1] or a positive int count."""


class UnknownMethodError(PruneError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MediaKindError(PruneError, ValueError):
    """A method that needs one kind of media (e.g. video) was given another."""


class AttentionImplementationError(PruneError, ValueError):
    """An attention implementation or cache type the engine cannot serve."""


class InputError(PruneError, ValueError):
    """Inputs the engine cannot prune correctly (e.g. a pre-filled cache with new media)."""


class MethodOptionError(PruneError, ValueError):
    """A method hyperparameter set to a value the method does not accept."""

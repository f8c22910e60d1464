"""The errors that stop training on a non-finite loss or gradient."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "NonFiniteLossError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient had inf / NaN entries; the parameters it reached were not updated."""


class NonFiniteLossError(FloatingPointError):
    """The loss was inf / NaN; nothing was updated by that step."""

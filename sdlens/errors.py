"""The one error type of sdlens: a choice that cannot be satisfied, with the valid choices named.

Every bad argument — a word not in the prompt, a layer, step or head that was not captured, a
spec the model cannot give, an unreadable trace file — raises ``CaptureError`` (a ``ValueError``),
whose message says what was wrong and what would be valid.
"""

from __future__ import annotations


class CaptureError(ValueError):
    """A capture spec, a hook, or a trace query that cannot be satisfied; the message lists valid choices."""


class BudgetError(CaptureError):
    """The capture would take more memory than ``max_bytes`` allows."""


__all__ = ["BudgetError", "CaptureError"]

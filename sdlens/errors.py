"""The one error type of sdlens: a choice that cannot be satisfied, with the valid choices named.

Every bad argument — a word not in the prompt, a layer, step or head that was not captured, a
spec the model cannot give, an unreadable trace file, an edit that cannot be made — raises
``CaptureError`` (a ``ValueError``; edits raise its subclass ``EditError``),
whose message says what was wrong and what would be valid.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class CaptureError(ValueError):
    """A capture spec, a hook, or a trace query that cannot be satisfied; the message lists valid choices."""


class BudgetError(CaptureError):
    """The capture would take more memory than ``max_bytes`` allows."""


class EditError(CaptureError):
    """An attention edit that cannot be made as asked (prompts that do not align, a word not in the
    prompt, a step fraction outside [0, 1], ...); raised before any denoising."""


class TraceWarning(UserWarning):
    """A traced run that kept less than was asked for (no step at all, or steps the run never made)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first caller outside sdlens (the user's ``with`` block)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of warn()
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


__all__ = ["BudgetError", "CaptureError", "EditError", "TraceWarning", "warn"]

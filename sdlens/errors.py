"""sdlens's one error family: a choice that cannot be satisfied, with the valid choices named.

Every user mistake raises a subclass of ``SdlensError`` (itself a ``ValueError``), whose message
says in one line what was wrong and what would be valid; ``except sdlens.SdlensError`` catches
them all. One class per part of the kit:

- ``CaptureError``: a trace spec, a hook, a trace query (a word not in the prompt, a layer, step or
  head that was not captured) or a trace file; ``BudgetError`` (a ``CaptureError``): over ``max_bytes``;
- ``EditError``: an attention edit that cannot be made as asked;
- ``SweepError``: a prompt file or a sweep folder;
- ``WorldError``: a caption, scene or picture of the shapes world;
- ``ModelError``: a built-in model, its configuration or its training;
- ``TokenError``: a tokenizer or prompt that cannot be aligned with its words;
- ``WebError``: the classroom page's export;
- ``CommandError``: an argument of an ``sdlens`` command.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class SdlensError(ValueError):
    """The base of every error sdlens raises for a user's mistake; the message lists valid choices."""


class CaptureError(SdlensError):
    """A capture spec, a hook, or a trace query that cannot be satisfied; the message lists valid choices."""


class BudgetError(CaptureError):
    """The capture would take more memory than ``max_bytes`` allows."""


class EditError(SdlensError):
    """An attention edit that cannot be made as asked (prompts that do not align, a word not in the
    prompt, a step fraction outside [0, 1], ...); raised before any denoising."""


class SweepError(SdlensError):
    """A prompt file or sweep folder that cannot be used as asked."""


class WorldError(SdlensError):
    """A caption, scene or picture the shapes world cannot take."""


class ModelError(SdlensError):
    """A built-in model, a model configuration or a training setting that cannot work."""


class TokenError(SdlensError):
    """A tokenizer or prompt whose slots cannot be aligned with its words."""


class WebError(SdlensError):
    """The classroom page cannot be written as asked."""


class CommandError(SdlensError):
    """An argument of an ``sdlens`` command that cannot work; the message is one line for the user."""


class TraceWarning(UserWarning):
    """A traced run that kept less than was asked for (no step at all, or steps the run never made)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first caller outside sdlens (the user's ``with`` block)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of warn()
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


__all__ = ["BudgetError", "CaptureError", "CommandError", "EditError", "ModelError", "SdlensError", "SweepError",
           "TokenError", "TraceWarning", "WebError", "WorldError", "warn"]

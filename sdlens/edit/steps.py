"""When an edit acts: step windows given as fractions of the run.

A window is a pair ``(start, end)`` of fractions of the denoising steps; step ``i`` of ``n`` is in it
when ``int(start·n) ≤ i < int(end·n)`` (Prompt-to-Prompt's convention: ``0.8`` is the first 80% of
the steps). A single number ``f`` means ``(0, f)``; ``0`` means never.
"""

from __future__ import annotations

from numbers import Real

from ..errors import EditError
from ..select import select_word
from ..tokens import Tokenization

Window = tuple[float, float]


def window(value, name: str) -> Window:
    """``value`` (a fraction or a ``(start, end)`` pair of fractions) as a checked window."""
    if isinstance(value, Real) and not isinstance(value, bool):
        pair = (0.0, float(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, Real) and not isinstance(v, bool) for v in value):
        pair = (float(value[0]), float(value[1]))
    else:
        raise EditError(f"{name} must be a step fraction in [0, 1] or a (start, end) pair of them; got {value!r}")
    start, end = pair
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0) or start > end:
        raise EditError(f"{name}={value!r}: fractions must lie in [0, 1], with start ≤ end")
    return pair


def in_window(w: Window, step: int, n_steps: int) -> bool:
    """Step ``step`` (from 0) of a run of ``n_steps`` lies in ``w``."""
    return int(w[0] * n_steps) <= step < int(w[1] * n_steps)


def word_windows(value, target: Tokenization, name: str = "cross_window") -> tuple[Window, dict[int, Window]]:
    """A window for every slot: ``(default, {slot: window})``.

    ``value`` is a window (every slot), or a dict from words of the target prompt to windows, with
    an optional ``"default"`` entry for every other slot (default 1.0, the whole run).
    """
    if not isinstance(value, dict):
        return window(value, name), {}
    default = window(value.get("default", 1.0), f"{name}['default']")
    per_slot: dict[int, Window] = {}
    for word, w in value.items():
        if word == "default":
            continue
        index = select_word(target, word, what=name, error=EditError)
        for slot in target.word_tokens[index]:
            per_slot[slot] = window(w, f"{name}[{word!r}]")
    return default, per_slot


__all__ = ["Window", "in_window", "window", "word_windows"]

"""Layer and step selectors: the one meaning of ``layers=`` and ``steps=`` everywhere.

Used by the capture spec (what to record) and by the trace (what to read back), so that a
selector means the same before and after a run. Steps are indices in sampling order from 0;
negative indices count from the end of the steps the run *made* (not of those captured).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from .errors import CaptureError

LayerSelector = None | str | int | Sequence[str | int] | Callable[[str], bool]
StepSelector = None | int | Sequence[int]


def select_layers(
    selector: LayerSelector,
    names: Sequence[str],
    sizes: dict[str, tuple[int, int]] | None = None,
    *,
    what: str = "layers",
) -> list[str]:
    """Names in ``names`` (order kept) chosen by ``selector``.

    ``selector`` is ``None`` (all), a name or glob pattern (``"up_blocks.*attn2"``), an ``int`` map
    side (``16`` picks layers whose map is 16 pixels high or wide; needs ``sizes``), a list of those,
    or a predicate on the name. Anything that matches nothing raises, listing what exists.

    >>> select_layers("up.*", ["down.attn2", "up.attn2"])
    ['up.attn2']
    """
    if selector is None:
        return list(names)
    if callable(selector) and not isinstance(selector, str):
        chosen = [n for n in names if selector(n)]
        if not chosen:
            raise CaptureError(f"the {what} predicate matched no layer; layers are: {list(names)}")
        return chosen
    items = [selector] if isinstance(selector, (str, int)) else list(selector)
    picked: set[str] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise CaptureError(
                f"{what} must be None, a name or glob pattern, an int map size, a list of these, or a "
                f"predicate; got {item!r}"
            )
        if isinstance(item, int):
            if sizes is None:
                raise CaptureError(f"{what}: map sizes are not known yet, cannot select by size {item}")
            hits = [n for n in names if item in sizes[n]]
            if not hits:
                avail = sorted({s for n in names for s in sizes[n]}, reverse=True)
                raise CaptureError(f"{what}: no layer has map size {item}; sizes are {avail}")
        else:
            hits = [n for n in names if n == item or fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise CaptureError(f"{what}: {item!r} matches no layer; layers are: {list(names)}")
        picked.update(hits)
    return [n for n in names if n in picked]


def by_size(selector: LayerSelector) -> bool:
    """Whether a selector names map sizes (an int, or a list holding one)."""
    if isinstance(selector, bool):
        return False
    if isinstance(selector, int):
        return True
    return isinstance(selector, (list, tuple)) and any(isinstance(s, int) and not isinstance(s, bool) for s in selector)


def check_steps(selector: StepSelector, *, what: str = "steps") -> list[int]:
    """The step indices of a selector, type-checked (not yet range-checked): a list of ints."""
    if selector is None:
        return []
    if isinstance(selector, (str, bytes)) or not isinstance(selector, (int, Sequence)) or isinstance(selector, bool):
        raise CaptureError(f"{what} must be None, a step index or a list of step indices (ints from 0); got {selector!r}")
    items = [selector] if isinstance(selector, int) else list(selector)
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int):
            raise CaptureError(f"{what} must be ints (step indices from 0); got {s!r} in {selector!r}")
    return items


def select_steps(selector: StepSelector, n_steps: int, *, what: str = "steps") -> list[int]:
    """Step indices (sampling order, from 0) chosen by ``selector``, sorted; negative ones count from the
    end of a run of ``n_steps`` steps.

    >>> select_steps([0, -1], 25)
    [0, 24]
    """
    if selector is None:
        return list(range(n_steps))
    out = []
    for s in check_steps(selector, what=what):
        t = s + n_steps if s < 0 else s
        if not 0 <= t < n_steps:
            raise CaptureError(f"step {s} is out of range: this run has steps 0..{n_steps - 1}")
        out.append(t)
    return sorted(set(out))


__all__ = ["LayerSelector", "StepSelector", "by_size", "check_steps", "select_layers", "select_steps"]

"""Resolving what a user names: layers, steps, step counts, words and choices, here and only here.

``layers=`` and ``steps=`` mean the same in the capture spec (what to record) and in the trace (what
to read back). Steps are indices in sampling order from 0; negative indices count from the end of
the steps the run *made* (not of those captured). A step count (``num_inference_steps``), a word of
a prompt (``select_word``) and a choice among names (``check_choice``) are checked here too, for the
trace, the edits, the viz, the explorers and the commands alike.

Every bad choice raises one ``SdlensError`` subclass with a one-line message that lists the valid
ones: ``CaptureError`` by default, or the class of the part of the kit that asked (``error=``:
``EditError`` for an edit, a ``CommandError`` for a command's argument), so that each part raises
its own class with the same message.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import TYPE_CHECKING

from .errors import CaptureError, SdlensError

if TYPE_CHECKING:
    from .tokens import Tokenization

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


def check_step(value, *, what: str = "step", error: type[SdlensError] = CaptureError) -> int:
    """One step index (an int; not yet range-checked)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(f"{what} must be one step index (an int from 0, or negative from the end); got {value!r}")
    return int(value)


def check_step_count(value, *, what: str = "num_inference_steps", error: type[SdlensError] = CaptureError) -> int:
    """A step count: an int of at least 1.

    >>> check_step_count(25)
    25
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise error(f"{what}={value!r}: a step count must be an int of at least 1")
    return int(value)


def check_choice(value, choices: Sequence, *, what: str, error: type[SdlensError] = CaptureError):
    """``value`` if it is one of ``choices``; else ``error`` listing them.

    >>> check_choice("ddim", ("ddim", "null-text"), what="inversion")
    'ddim'
    """
    try:
        if value in choices:
            return value
    except TypeError:  # an unhashable or incomparable value: not a choice
        pass
    raise error(f"{what}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}")


_LABEL = re.compile(r"(.+) \((\d+)\)")  # "red (2)": the 2nd "red" of a prompt


def select_word(tok: Tokenization, word, *, occurrence: int | None = None, what: str = "",
                error: type[SdlensError] = CaptureError, missing: str = "") -> int:
    """Index into ``tok.words`` of ``word``: a word of the prompt, its label (``"red (2)"`` for the second
    "red", see ``Tokenization.word_labels``) or a word index. Matching ignores case, then end punctuation
    ("circle" finds "circle,"). A word the prompt holds twice needs a label, an index or ``occurrence``.

    ``what`` prefixes the message (``"weights"``); ``missing`` is added where the word is not in the prompt.

    >>> from sdlens.tokens import tokenize
    >>> t = tokenize("a red circle and a red square")
    >>> select_word(t, "circle"), select_word(t, "red (2)"), select_word(t, "red", occurrence=0), select_word(t, 2)
    (2, 5, 1, 2)
    """
    prefix = f"{what}: " if what else ""
    if isinstance(word, bool) or not isinstance(word, (str, Integral)):
        raise error(f"{prefix}a word is a word of the prompt, its label or its index; got {word!r}")
    if isinstance(word, Integral):
        if not 0 <= word < len(tok.words):
            raise error(f"{prefix}word index {word} is out of range: the prompt's words are {tok.words} "
                        f"(0..{len(tok.words) - 1})")
        return int(word)
    matches = tok.word_indices(word)
    if not matches:
        if occurrence is None and (labelled := word_occurrences(tok, word)):
            return labelled[0]
        if tok.truncated and _in_text(word, tok.prompt):
            raise error(f"{prefix}{word!r} was cut off: the prompt is longer than the {len(tok.ids)} slots of the text "
                        f"encoder, which saw only its first {len(tok.words)} words (up to {tok.words[-1]!r})")
        raise error(f"{prefix}{word!r} is not a word of this prompt; its words are {tok.word_labels}{missing}")
    if occurrence is None:
        if len(matches) > 1:
            labels = tok.word_labels
            choices = ", ".join(f"{labels[i]!r} (word {i}, slots {tok.word_tokens[i]})" for i in matches[:5])
            choices += ", ..." if len(matches) > 5 else ""
            raise error(f"{prefix}{word!r} occurs {len(matches)} times in the prompt; name one: {choices}, or give "
                        f"its word index, or pass occurrence=0..{len(matches) - 1}")
        return matches[0]
    if isinstance(occurrence, bool) or not isinstance(occurrence, Integral) or not 0 <= occurrence < len(matches):
        raise error(f"{prefix}occurrence={occurrence!r} is out of range: {word!r} occurs {len(matches)} time(s), "
                    f"so occurrence must be in 0..{len(matches) - 1}")
    return matches[occurrence]


def word_occurrences(tok: Tokenization, word) -> list[int]:
    """Indices into ``tok.words`` of every word ``word`` names: each occurrence of a word, the one a label
    (``"red (2)"``) or an index names; ``[]`` when it names none (``select_word`` says why).

    >>> from sdlens.tokens import tokenize
    >>> t = tokenize("a red circle and a red square")
    >>> word_occurrences(t, "red"), word_occurrences(t, "red (2)"), word_occurrences(t, "blue")
    ([1, 5], [5], [])
    """
    if isinstance(word, Integral) and not isinstance(word, bool):
        return [int(word)] if 0 <= word < len(tok.words) else []
    if not isinstance(word, str):
        return []
    matches = tok.word_indices(word)
    if matches:
        return matches
    labelled = _LABEL.fullmatch(word.strip())
    if labelled:
        same = tok.word_indices(labelled[1])
        k = int(labelled[2])
        if len(same) > 1 and 1 <= k <= len(same):
            return [same[k - 1]]
    return []


def _in_text(word: str, prompt: str) -> bool:
    """``word`` is one of the whitespace-separated words of ``prompt`` (case and end punctuation ignored)."""
    strip = ",.;:!?\"'()"
    return word.lower().strip(strip) in {w.lower().strip(strip) for w in prompt.split()}


__all__ = ["LayerSelector", "StepSelector", "by_size", "check_choice", "check_step", "check_step_count", "check_steps",
           "select_layers", "select_steps", "select_word", "word_occurrences"]

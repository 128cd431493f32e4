"""Which slot of the edited prompt takes its attention from which slot of the base prompt.

An edit copies the base prompt's cross-attention maps into the edited prompt's branch. Maps belong
to the text encoder's slots (77 for CLIP), and two prompts fill their slots differently: a word
may take one token in one prompt and two in the other, and every slot after a longer word moves.
An ``Alignment`` holds the mapping as a matrix ``M (base slots, target slots)``: the edited branch
gets ``p_base @ M`` where it is aligned, and keeps its own probabilities where it is not.

- ``replace``: the prompts have the same number of words; word ``i`` of the base maps to word ``i``
  of the target (a swapped word takes the map of the word it replaces). A base word of ``m`` tokens
  and a target word of ``n`` tokens: every base token hands ``1/n`` of its probability to each
  target token, so the word's total attention is kept.
- ``refine``: words are added to or removed from the base; the words the two prompts share (the
  longest matching runs, as ``difflib`` finds them) are aligned, and the target's new words keep
  their own attention.

The start slot maps to the start slot; the end slot and the padding map in order, shifted by the
difference in length (the base's last slots pile onto the target's last slot when the target is
shorter), so that every base slot hands on all of its probability.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from ..errors import EditError
from ..select import check_choice
from ..tokens import Tokenization
from ..vocabulary import renamed


@dataclass(frozen=True)
class Alignment:
    """The slot mapping from a base prompt to one edited prompt.

    Attributes:
        base, target: the two prompts' tokenizations.
        kind: ``"replace"`` or ``"refine"``.
        matrix: ``(base slots, target slots)`` float32; column ``j`` says which base slots feed
            target slot ``j`` (rows sum to 1 where a base slot is aligned).
        aligned: ``(target slots,)`` bool; False for a new word of a refinement (it keeps its own map).
        word_pairs: ``(base word, target word)`` index pairs that are aligned.
    """

    base: Tokenization
    target: Tokenization
    kind: str
    matrix: torch.Tensor
    aligned: torch.Tensor
    word_pairs: tuple[tuple[int, int], ...]

    @property
    def swapped(self) -> list[tuple[str, str]]:
        """The aligned word pairs whose words differ (a replace's swaps)."""
        return [(self.base.words[i], self.target.words[j]) for i, j in self.word_pairs
                if self.base.words[i].lower() != self.target.words[j].lower()]

    @property
    def added(self) -> list[str]:
        """Target words with no base word (a refinement's additions)."""
        paired = {j for _, j in self.word_pairs}
        return [w for j, w in enumerate(self.target.words) if j not in paired]


def _check_lengths(base: Tokenization, target: Tokenization) -> None:
    if len(base.ids) != len(target.ids):
        raise EditError(f"the prompts fill different numbers of slots ({len(base.ids)} and {len(target.ids)})")
    for t in (base, target):
        if t.truncated:
            raise EditError(f"the prompt {t.prompt!r} is longer than the text encoder's {len(t.ids)} slots; shorten it")


def _specials(matrix: torch.Tensor, base: Tokenization, target: Tokenization) -> None:
    """Start to start; end and padding in order, shifted by the difference in length."""
    n = len(base.ids)
    matrix[0, 0] = 1.0
    nb, nt = base.n_real, target.n_real  # the end slot is at n_real - 1
    for s in range(nb - 1, n):
        matrix[s, min(s - nb + nt, n - 1)] += 1.0


def _pair_words(matrix: torch.Tensor, base: Tokenization, target: Tokenization, i: int, j: int) -> None:
    src, dst = base.word_tokens[i], target.word_tokens[j]
    for s in src:
        for d in dst:
            matrix[s, d] += 1.0 / len(dst)


def _build(base: Tokenization, target: Tokenization, kind: str, pairs: list[tuple[int, int]]) -> Alignment:
    n = len(base.ids)
    matrix = torch.zeros(n, n)
    _specials(matrix, base, target)
    for i, j in pairs:
        _pair_words(matrix, base, target, i, j)
    aligned = matrix.sum(0) > 0
    return Alignment(base, target, kind, matrix, aligned, tuple(pairs))


def replace_alignment(base: Tokenization, target: Tokenization) -> Alignment:
    """Word ``i`` of ``base`` to word ``i`` of ``target``; the prompts must have as many words."""
    _check_lengths(base, target)
    if len(base.words) != len(target.words):
        matcher = difflib.SequenceMatcher(a=base.words, b=target.words, autojunk=False)
        only_base, only_target = [], []
        for op, a0, a1, b0, b1 in matcher.get_opcodes():
            if op != "equal":
                only_base += base.words[a0:a1]
                only_target += target.words[b0:b1]
        raise EditError(
            f"replace swaps words one for one, but the base prompt has {len(base.words)} words and the target "
            f"{len(target.words)}: unmatched words {only_base} in the base and {only_target} in the target. "
            "Give both prompts the same number of words, or use sdlens.edit.refine to add or remove words"
        )
    return _build(base, target, "replace", [(i, i) for i in range(len(base.words))])


def refine_alignment(base: Tokenization, target: Tokenization) -> Alignment:
    """The words the prompts share, in order (``difflib``'s matching blocks), aligned; new words are not."""
    _check_lengths(base, target)
    key = [w.lower() for w in base.words], [w.lower() for w in target.words]
    matcher = difflib.SequenceMatcher(a=key[0], b=key[1], autojunk=False)
    pairs = [(blk.a + k, blk.b + k) for blk in matcher.get_matching_blocks() for k in range(blk.size)]
    if not pairs:
        raise EditError(
            f"refine aligns the words two prompts share, and {base.prompt!r} and {target.prompt!r} share none; "
            "to swap words one for one use sdlens.edit.replace"
        )
    return _build(base, target, "refine", pairs)


@renamed(kind="method")
def align(base: Tokenization, target: Tokenization, method: str) -> Alignment:
    """``replace_alignment`` or ``refine_alignment`` by the edit method's name (``"replace"``, ``"refine"``)."""
    check_choice(method, ("replace", "refine"), what="method", error=EditError)
    return replace_alignment(base, target) if method == "replace" else refine_alignment(base, target)


__all__ = ["Alignment", "align", "refine_alignment", "replace_alignment"]

"""Where the cross-attention mass goes: a word's share of it, and the shares of each kind of key slot.

Each query pixel spreads its attention over the key slots (77 CLIP slots: start, the words' tokens,
end, padding; SD 3 adds T5's slots after them). A share is the slots' sum over all slots' sum,
averaged over the pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..vocabulary import renamed

SLOT_KINDS = ("start", "word", "end", "pad")
JOINT_SLOT_KINDS = (*SLOT_KINDS, "t5")  # SD 3: keys after the CLIP tokenizer's slots are T5's


def _mass(trace, slots: Sequence[int], sel: dict) -> float:
    """Mean over the pixels of the summed attention of key ``slots`` (taken at the latent grid's size)."""
    m = trace.slot_map(list(slots), **sel, size=trace.latent_size or trace.image_size)
    return float(m.mean()) * len(slots)


@renamed(prompt="prompt_index")
def slot_shares(trace, slot_groups: Iterable[Sequence[int]], *, prompt_index: int = 0, steps=None, layers=None,
                heads=None) -> list[float]:
    """Share (0..1) of the cross-attention mass of ``prompt`` that goes to each group of key slots.

    ``steps``, ``layers``, ``heads`` select as ``AttentionTrace.slot_map``.
    """
    sel = dict(prompt_index=prompt_index, steps=steps, layers=layers, heads=heads)
    total = _mass(trace, range(len(trace.tokens(prompt_index))), sel)
    return [_mass(trace, slots, sel) / total if total > 0 else 0.0 for slots in slot_groups]


def kind_shares(mass: torch.Tensor, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Share of the attention that goes to each kind of key slot: ``{kind: (...)}``.

    ``mass``: ``(..., keys)``, the attention each key slot gets (e.g. averaged over pixels and heads);
    ``kinds``: the kind of each of the prompt's CLIP slots (``Tokenization.kinds``); keys after them
    are T5's (SD 3), and then the kinds include ``"t5"``. Shares are of the sum over the keys (for
    a joint layer, the text part of its softmax), so they add up to 1.

    >>> shares = kind_shares(torch.tensor([0.5, 0.25, 0.125, 0.125]), ["start", "word", "end", "pad"])
    >>> {k: float(v) for k, v in shares.items()}
    {'start': 0.5, 'word': 0.25, 'end': 0.125, 'pad': 0.125}
    """
    mass = mass.float()
    key_kinds = list(kinds) + ["t5"] * (mass.shape[-1] - len(kinds))
    names = JOINT_SLOT_KINDS if "t5" in key_kinds else SLOT_KINDS
    total = mass.sum(-1)
    return {k: mass[..., [i for i, kk in enumerate(key_kinds) if kk == k]].sum(-1) / total for k in names}


__all__ = ["JOINT_SLOT_KINDS", "SLOT_KINDS", "kind_shares", "slot_shares"]

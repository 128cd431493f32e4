"""Editing with attention, on the hook layer that capture uses (``sdlens.hooks``).

    import sdlens
    from sdlens import edit

    pipe = sdlens.load_pipeline()
    r = edit.replace(pipe, "a red circle", "a blue circle", seed=3)   # word swap
    r = edit.refine(pipe, "a red circle", "a small red circle")       # words added
    r = edit.reweight(pipe, "a big red circle", {"big": 2.0})         # a word's attention scaled
    r = edit.inject_self(pipe, "a red circle", "a blue square")       # the base's self-attention kept
    r.images    # the base first, then the edited image(s)

``blend=`` (local blend), ``weights=`` (reweighting, chainable with any edit), ``image=`` (a real
picture, inverted as ``inversion=`` says) and ``trace=`` work with each of them; ``cross_window=`` and
``self_window=`` say when (as step fractions) the base's attention is kept. ``edit(method=...)``
runs any of them by name (``METHODS``).
"""

from .align import Alignment, align, refine_alignment, replace_alignment
from .blend import Blend
from .inversion import INVERSIONS, Inversion, invert
from .run import METHODS, EditResult, edit, inject_self, refine, replace, reweight

__all__ = [
    "INVERSIONS",
    "METHODS",
    "Alignment",
    "Blend",
    "EditResult",
    "Inversion",
    "align",
    "edit",
    "inject_self",
    "invert",
    "refine",
    "refine_alignment",
    "replace",
    "replace_alignment",
    "reweight",
]

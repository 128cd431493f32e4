"""The hook layer: one attention processor with named points, and ``attach`` that installs it.

Capture (``sdlens.capture``) and editing are controllers on these hooks::

    from sdlens.hooks import Controller, attach

    class Scale(Controller):                 # a probability editor
        edits = True
        def __init__(self, slot, factor): self.slot, self.factor = slot, factor
        def layers(self, run): return [i.name for i in run.layers if i.role == "cross"]
        def probs(self, call, p):
            p = p.clone(); p[..., self.slot] *= self.factor
            return p

    with attach(pipe, [Scale(2, 0.0)]):
        pipe("a red circle on the left")
"""

from .attach import Attachment, attach
from .layers import LayerInfo, attention_layers, denoiser_of, infer_map_size
from .processor import Call, Controller, HookProcessor
from .rows import Row, RowLayout
from .run import Run

__all__ = [
    "Attachment",
    "Call",
    "Controller",
    "HookProcessor",
    "LayerInfo",
    "Row",
    "RowLayout",
    "Run",
    "attach",
    "attention_layers",
    "denoiser_of",
    "infer_map_size",
]

"""Notebook explorers (ipywidgets; JupyterLab and classic Notebook). The trace explorers never re-run
the model; the edit explorer re-runs an edit when a slider is released.

    from sdlens.widgets import AttentionExplorer, SelfAttentionExplorer, DenoisingExplorer
    AttentionExplorer(tr, image)        # word, step (play), layer / map size, head, opacity
    SelfAttentionExplorer(tr, image)    # a query pixel, step, layer, head
    DenoisingExplorer(tr)               # x_t, predicted x0 and the noise level per step
    EditExplorer(pipe, base, target)    # an attention edit's step fractions, blend and word weights

Each explorer has ``controls`` (name → widget), ``render()`` (the picture as ``uint8 (H, W, 3)``),
``settings()`` (the matching ``sdlens.viz`` keyword arguments) and ``ui`` (the widget tree).
"""

from .attention import AttentionExplorer
from .base import Explorer
from .denoising import DenoisingExplorer
from .edit import EditExplorer
from .self_attention import SelfAttentionExplorer

__all__ = ["AttentionExplorer", "DenoisingExplorer", "EditExplorer", "Explorer", "SelfAttentionExplorer"]

"""Notebook explorers of a trace (ipywidgets; JupyterLab and classic Notebook). They never re-run the model.

    from sdlens.widgets import AttentionExplorer, SelfAttentionExplorer, DenoisingExplorer
    AttentionExplorer(tr, image)        # word, step (play), layer / map size, head, opacity
    SelfAttentionExplorer(tr, image)    # a query pixel, step, layer, head
    DenoisingExplorer(tr)               # x_t, predicted x0 and the noise level per step

Each explorer has ``controls`` (name → widget), ``render()`` (the picture as ``uint8 (H, W, 3)``),
``settings()`` (the matching ``sdlens.viz`` keyword arguments) and ``ui`` (the widget tree).
"""

from .attention import AttentionExplorer
from .base import Explorer
from .denoising import DenoisingExplorer
from .self_attention import SelfAttentionExplorer

__all__ = ["AttentionExplorer", "DenoisingExplorer", "Explorer", "SelfAttentionExplorer"]

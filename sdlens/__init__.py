"""sdlens: a lens on Stable Diffusion's attention.

    import sdlens
    pipe = sdlens.load_pipeline()            # the built-in offline model (or a diffusers id / folder)
    with sdlens.trace(pipe) as tr:
        image = pipe("a red circle on the left").images[0]
    tr.word_map("circle")                    # (H, W) cross-attention heat map of a word
"""

from .capture import trace
from .errors import BudgetError, CaptureError
from .result import AttentionTrace, load_trace

__version__ = "0.1.0"


def load_pipeline(name: str = "tiny", **kwargs):
    """A diffusers pipeline: ``"tiny"`` is the built-in offline model; anything else goes to diffusers."""
    from .models import load_pipeline as _load

    return _load(name, **kwargs)


__all__ = ["AttentionTrace", "BudgetError", "CaptureError", "load_pipeline", "load_trace", "trace", "__version__"]

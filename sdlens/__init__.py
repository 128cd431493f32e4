"""sdlens: a lens on Stable Diffusion's attention.

    import sdlens
    pipe = sdlens.load_pipeline()            # the built-in offline model (or a diffusers id / folder)
    with sdlens.trace(pipe) as tr:
        image = pipe("a red circle on the left").images[0]
    tr.word_map("circle")                    # (H, W) cross-attention heat map of a word
"""

from .capture import trace
from .errors import BudgetError, CaptureError, EditError, SdlensError
from .result import AttentionTrace, load_trace

__version__ = "0.1.0"


def load_pipeline(name: str = "tiny", **kwargs):
    """A diffusers pipeline: ``"tiny"`` is the built-in offline model; anything else goes to diffusers."""
    from .models import load_pipeline as _load

    return _load(name, **kwargs)


# subpackages reachable as attributes after a plain `import sdlens` (sdlens.edit.replace, sdlens.viz.word_grid),
# imported on first use so that `import sdlens` stays light
_SUBPACKAGES = ("anatomy", "capture", "classroom", "edit", "hooks", "maps", "models", "result", "sweep", "tokens",
                "viz", "web", "widgets", "world")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sdlens' has no attribute {name!r}")


__all__ = ["AttentionTrace", "BudgetError", "CaptureError", "EditError", "SdlensError", "load_pipeline", "load_trace", "trace", "__version__"]

"""The built-in model: a small Stable Diffusion (VAE, UNet, CLIP text encoder, scheduler) of the shapes world.

- `configs`: the architecture and its variants (`TinyConfig`);
- `train`: the training stages and `train_tiny` (the `sdlens train-tiny` command);
- `load`: `load_pipeline`, for the built-in model, a trained folder or any diffusers pipeline.
"""

from sdlens.models.configs import TinyConfig
from sdlens.models.load import TINY_DIR, load_pipeline

__all__ = ["TINY_DIR", "TinyConfig", "load_pipeline", "train_tiny"]


def train_tiny(*args, **kwargs):
    """Train the tiny model; see `sdlens.models.train.train_tiny`."""
    from sdlens.models.train import train_tiny as _train_tiny

    return _train_tiny(*args, **kwargs)

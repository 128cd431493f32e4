"""The built-in models: small Stable Diffusions of the shapes world, "tiny" (a UNet, SD 1.x's design)
and "tiny-sd3" (a pure transformer, SD 3's design).

- `configs`: the UNet model's architecture and its variants (`TinyConfig`);
- `training`: the training stages, one module a job, and `train_tiny` (the `sdlens train-tiny` command);
  `train` is its old address, re-exporting its names;
- `mmdit`: tiny-sd3's architecture and its flow-matching training (`train-tiny --arch sd3`);
- `load`: `load_pipeline`, for the built-in model, a trained folder or any diffusers pipeline.
"""

from sdlens.models.configs import TinyConfig
from sdlens.models.load import BUILTIN, TINY_DIR, TINY_SD3_DIR, load_pipeline

__all__ = ["BUILTIN", "TINY_DIR", "TINY_SD3_DIR", "TinyConfig", "load_pipeline", "train_tiny"]


def train_tiny(*args, **kwargs):
    """Train the tiny model; see `sdlens.models.training.train_tiny`."""
    from sdlens.models.training import train_tiny as _train_tiny

    return _train_tiny(*args, **kwargs)

"""The tiny model's training, by its old address: everything now lives in ``sdlens.models.training``
(one module a job: ``budget``, ``run``, ``data``, ``ema``, ``loop``, ``clip``, ``vae``, ``unet``,
``export``, ``machine``, ``tiny``); the names below keep working from here.

    from sdlens.models.train import Budget, train_tiny   # as sdlens.models.training
"""

from sdlens.models import training as _training
from sdlens.models.training import *  # noqa: F403  (every name, by its old address)
from sdlens.models.training.export import prefix_text_encoder_keys as _prefix_text_encoder_keys
from sdlens.models.training.machine import describe_device as _describe_device
from sdlens.models.training.machine import versions as _versions

__all__ = [*_training.__all__, "_describe_device", "_prefix_text_encoder_keys", "_versions"]

"""Random-weight models for tests: weights where diffusers initialises zeros."""

from __future__ import annotations

import torch


def give_weights(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Every matrix of ``module`` drawn from N(0, scale²): a zero-initialised output layer would make
    attention change nothing in the picture and hide any error in it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=g) * scale)

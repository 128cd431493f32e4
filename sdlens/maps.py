"""Turning per-layer attention grids into maps over the image.

Layers see the image at different resolutions (64/32/16/8 for SD 1.5 at 512 px); to combine them
each grid is upsampled to one output size first, then averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import CaptureError


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a ``(h, w)`` grid to ``size`` ``(H, W)``; float32.

    Bilinear interpolation of non-negative values stays non-negative, so a probability map stays one.
    """
    g = grid.float()
    if tuple(g.shape) == tuple(size):
        return g
    return F.interpolate(g[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def average_upsampled(grids: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean of ``grids`` (each ``(h_i, w_i)``) after upsampling each to ``size``: ``(H, W)`` float32."""
    if not grids:
        raise CaptureError("no maps to average: the selection of layers/steps is empty")
    return torch.stack([upsample(g, size) for g in grids]).mean(0)


def normalize(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min–max normalise a map to [0, 1] (a constant map becomes all zeros)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo).clamp_min(eps)


def agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two maps of one size agree: the geometric mean of the two, each min–max normalised; in [0, 1].

    >>> agreement(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 7.0, 9.0])).tolist()
    [0.0, 0.5, 1.0]
    """
    return (normalize(a) * normalize(b)).sqrt()

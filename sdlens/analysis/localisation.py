"""How a word's map sits on the image: does it find the object (a true mask), how spread is it, where is its peak."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..maps import normalize
from ..world.analyze import mask_iou


def localisation(heat: torch.Tensor, mask: np.ndarray) -> dict:
    """IoU of the map's upper half (min-max normalised, ≥ 0.5) with ``mask``, and whether its peak is on it.

    >>> heat = torch.tensor([[0.0, 1.0], [0.2, 0.9]])
    >>> localisation(heat, np.array([[False, True], [False, False]]))
    {'iou': 0.5, 'peak': True}
    """
    m = heat.float().cpu()
    region = (normalize(m) >= 0.5).numpy()
    return {"iou": mask_iou(region, mask), "peak": bool(mask.flat[int(m.argmax())])}


def map_entropy(heat: torch.Tensor) -> float:
    """Entropy of the map scaled to sum 1, divided by the log of its number of pixels: 1 is flat, 0 one pixel.

    >>> round(map_entropy(torch.ones(4, 4)), 4), round(map_entropy(torch.tensor([[1.0, 1.0], [0.0, 0.0]])), 4)
    (1.0, 0.5)
    """
    flat = heat.float().flatten()
    p = flat / flat.sum().clamp_min(1e-12)
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(p.numel()))


def peak_position(heat: torch.Tensor) -> tuple[float, float]:
    """``(y, x)`` of the map's largest value, the pixel's centre as a fraction (0..1) of the height and width.

    >>> peak_position(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    (0.75, 0.75)
    """
    h, w = heat.shape
    top = int(heat.argmax())
    return (top // w + 0.5) / h, (top % w + 0.5) / w


__all__ = ["localisation", "map_entropy", "peak_position"]

"""Capture: the processors, the capture spec, step tracking and the ``trace`` context manager."""

from .layers import LayerInfo, attention_layers, denoiser_of
from .processor import CaptureProcessor
from .session import Recorder, trace
from .spec import BudgetError, CaptureError, CaptureSpec

__all__ = [
    "BudgetError",
    "CaptureError",
    "CaptureProcessor",
    "CaptureSpec",
    "LayerInfo",
    "Recorder",
    "attention_layers",
    "denoiser_of",
    "trace",
]

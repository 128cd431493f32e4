"""Capture: the processors, queries and keys to probabilities, the capture spec, step tracking and ``trace``."""

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

"""Capture: the controller that records attention maps, its spec and budget, and ``trace``."""

from ..errors import BudgetError, CaptureError
from .controller import Capture
from .spec import CaptureSpec, Estimate
from .tracing import Tracer, trace

__all__ = ["BudgetError", "Capture", "CaptureError", "CaptureSpec", "Estimate", "Tracer", "trace"]

"""The result of a trace: ``AttentionTrace`` (read-only maps with what they belong to), its storage while
recording, and its file format."""

from ..hooks.rows import Row
from .attention_trace import AttentionTrace, TraceInfo, load_trace
from .recording import Recording

__all__ = ["AttentionTrace", "Recording", "Row", "TraceInfo", "load_trace"]

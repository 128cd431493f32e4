"""Page-locking CPU tensors in place, so that GPU → host copies into them run asynchronously.

PyTorch's own pinned allocator would round each buffer up to a power of two and keep it locked
after the trace is gone; ``cudaHostRegister`` locks exactly the tensor's bytes, and is released
when the recording ends.
"""

from __future__ import annotations

import torch


def page_lock(t: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory in place; False if refused (copies are then synchronous)."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0
    except (RuntimeError, AttributeError):
        return False


def page_unlock(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


__all__ = ["page_lock", "page_unlock"]

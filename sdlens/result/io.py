"""A trace on disk: one safetensors file, the maps as tensors and the metadata as JSON in its header.

Loading never unpickles anything. Writing is atomic: a failed save leaves no file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CaptureError
from ..files import atomic_file

FORMAT = "sdlens.trace"
FORMAT_VERSION = 1


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``tensors`` and the JSON ``metadata`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    with atomic_file(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"sdlens": json.dumps(meta)})
    return path


def read(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a file written by ``write``; anything else raises ``CaptureError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta_raw = (f.metadata() or {}).get("sdlens")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise CaptureError(f"{str(path)!r} is not a safetensors file written by sdlens: {e}") from None
    if meta_raw is None:
        raise CaptureError(f"{str(path)!r} is a safetensors file but not an sdlens trace (no 'sdlens' metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise CaptureError(f"{str(path)!r}: its sdlens metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int) \
            or not 1 <= meta["format_version"] <= FORMAT_VERSION:
        got = meta if not isinstance(meta, dict) else (meta.get("format"), meta.get("format_version"))
        raise CaptureError(
            f"{str(path)!r} has format {got!r}; this sdlens reads {FORMAT!r} versions 1..{FORMAT_VERSION}"
        )
    return tensors, meta


__all__ = ["FORMAT", "FORMAT_VERSION", "read", "write"]

"""A trace on disk: one safetensors file, the maps as tensors and the metadata as JSON in its header.

Loading never unpickles anything. Writing is atomic: a failed save leaves no file behind. The
metadata holds a CRC-32 of every tensor's bytes, so a damaged file is refused, not read as maps.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

from ..errors import CaptureError
from ..files import atomic_file

FORMAT = "sdlens.trace"
FORMAT_VERSION = 2  # 2: CRC-32 checksums of the tensors (version 1 files, without them, are read unchecked)


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``tensors`` and the JSON ``metadata`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    checksums = {k: checksum(t) for k, t in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata, "checksums": checksums}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sdlens": json.dumps(meta)})
    return path


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (as stored: its dtype, C order)."""
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().data) if t.numel() else 0


def read(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a file written by ``write``; anything else raises ``CaptureError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {str(path)!r}")
    _check_device(device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
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
    sums = meta.get("checksums")
    if meta["format_version"] == 1:
        sums = {k: checksum(t) for k, t in tensors.items()}
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise CaptureError(f"{str(path)!r}: its metadata does not list a checksum for each of its tensors; "
                           "it was not written whole by sdlens")
    bad = [k for k, t in tensors.items() if checksum(t) != sums[k]]
    if bad:
        raise CaptureError(f"{str(path)!r} is damaged: the bytes of {bad[:3]}{' ...' if len(bad) > 3 else ''} "
                           "do not match the checksums written with them")
    return {k: t.to(device) for k, t in tensors.items()}, meta


def _check_device(device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CaptureError(f"device={device!r} is not a torch device ({e}); use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaptureError(f"device={device!r}: this machine has no CUDA device; load with device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CaptureError(f"device={device!r}: this machine has no MPS device; load with device='cpu'")


__all__ = ["FORMAT", "FORMAT_VERSION", "read", "write"]

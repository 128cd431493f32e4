"""Writing files so that a failure leaves nothing half-written, with the permissions of a normal file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shareable(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (``mkstemp``/``mkdtemp`` make private ones)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sdlens-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(out: str | os.PathLike, prefix: str = ".sdlens-") -> Iterator[tuple[Path, list[str]]]:
    """A temporary folder beside ``out`` to write files into; ``with staged_folder(out) as (tmp, names):``
    and append each file's name to ``names``. On success the files are made shareable and moved
    into ``out`` (created if needed); on any failure nothing is left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    names: list[str] = []
    try:
        yield tmp, names
        for name in names:  # mkdtemp/mkstemp make private files; these are for the user to share
            shareable(tmp / name)
        shareable(tmp, folder=True)
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in names:
                os.replace(tmp / name, out / name)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_file", "shareable", "staged_folder", "umask"]

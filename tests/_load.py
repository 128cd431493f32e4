"""Loading a script that is not part of the package (a benchmark, a build script) as a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Execute the Python file at ``path`` (relative paths are from the repository root) as a module."""
    path = Path(path)
    path = path if path.is_absolute() else REPO / path
    spec = importlib.util.spec_from_file_location(name or f"_sdlens_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

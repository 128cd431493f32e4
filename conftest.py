"""The README's examples run as doctests (``--doctest-glob=README.md``), each in a temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _readme_runs_in_a_temporary_folder(request, tmp_path, monkeypatch):
    if request.node.name.endswith("README.md"):
        monkeypatch.chdir(tmp_path)  # the example writes run.safetensors

"""The public surface of ``import sdlens``."""

from __future__ import annotations

import pytest

import sdlens


def test_subpackages_are_attributes_after_a_plain_import():
    import subprocess
    import sys

    code = ("import sdlens; print(sdlens.edit.replace.__name__, sdlens.viz.word_grid.__name__, "
            "sdlens.world.score.__name__, sdlens.widgets.AttentionExplorer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["replace", "word_grid", "score", "AttentionExplorer"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sdlens.nothing  # noqa: B018

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


def test_user_mistakes_across_the_kit_raise_the_one_error_family(tmp_path):
    """A wrong argument in each part of the kit raises its own SdlensError subclass (a ValueError)."""
    from sdlens.errors import (
        CaptureError,
        ModelError,
        SdlensError,
        SweepError,
        TokenError,
        WebError,
        WorldError,
    )
    from sdlens.models.families import sd1
    from sdlens.sweep import load
    from sdlens.tokens import tokenize
    from sdlens.web.export import write_page
    from sdlens.world import parse_caption

    pipe = sd1()
    mistakes = {
        CaptureError: lambda: sdlens.trace(pipe, heads="some"),
        sdlens.EditError: lambda: sdlens.edit.replace(pipe, "a red circle", "a red circle", cross_window=2.0),
        SweepError: lambda: load(tmp_path),
        WorldError: lambda: parse_caption("a purple dog"),
        ModelError: lambda: sdlens.models.TinyConfig(image_size=63),
        TokenError: lambda: tokenize("a red circle", max_length=1),
        WebError: lambda: write_page(tmp_path / "page", model="tiny-sd3"),
    }
    for cls, call in mistakes.items():
        with pytest.raises(cls) as caught:
            call()
        assert isinstance(caught.value, SdlensError) and isinstance(caught.value, ValueError), cls
        assert "\n" not in str(caught.value).strip(), cls  # one line
    assert not issubclass(SweepError, CaptureError) and not issubclass(sdlens.EditError, CaptureError)

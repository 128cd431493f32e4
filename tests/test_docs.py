"""The documentation site (``mkdocs.yml``) opened in Chromium: the API reference shows the docstrings and their
examples as code, the CLI reference every subcommand, a notebook page its outputs.

The site is ``$SDLENS_SITE_DIR`` when set (``.ci/run`` points it at the site ``scripts/build_docs.py`` built, with
the executed notebooks); otherwise the test builds one (``mkdocs build --strict``; the notebooks as committed,
without outputs) and skips where the docs dependencies (``pip install -e ".[docs]"``) are missing.
``SDLENS_DOCS_SCREENSHOT=1`` also writes the screenshot to ``docs/site-page.png``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from _browser import chromium_page, serve

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get("SDLENS_SITE_DIR")
    if given:
        path = ROOT / given
        assert (path / "index.html").exists(), f"SDLENS_SITE_DIR={given}: no built site there"
        return path
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
        pytest.importorskip(module, reason='the docs dependencies: pip install -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def served(site):
    with serve(site) as url:
        yield url


@pytest.fixture(scope="module")
def page(served):
    with chromium_page() as page:
        # offline: only the local server answers (the notebooks' MathJax from a CDN is refused)
        page.route("**/*", lambda route: route.continue_() if urlparse(route.request.url).hostname == "127.0.0.1"
                   else route.abort())
        yield page


def _plain(text: str) -> str:
    """A docstring line as the page shows it: no code backticks."""
    return re.sub(r"`+", "", text)


def test_api_page_shows_docstrings_and_their_examples(page, served, tmp_path):
    import sdlens.tokens

    page.goto(served + "api/tokens/")
    body = page.inner_text("article")
    first = inspect.getdoc(sdlens.tokens.tokenize).splitlines()[0]
    assert _plain(first) in body
    code = "\n".join(page.eval_on_selector_all("article pre", "els => els.map(e => e.innerText)"))
    assert 't.word_index("red", occurrence=1)' in code  # the doctest, as code

    page.goto(served + "api/world/")  # a doctest written flush left in a module docstring: a code block too
    code = "\n".join(page.eval_on_selector_all("article pre", "els => els.map(e => e.innerText)"))
    assert "render(scene, size=64, seed=0)" in code

    page.goto(served + "api/trace/")
    assert "Capture attention maps while pipe runs" in page.inner_text("article")
    shot = tmp_path / "site-page.png"
    page.screenshot(path=str(shot), full_page=False)
    print(f"screenshot: {shot}")
    if os.environ.get("SDLENS_DOCS_SCREENSHOT"):
        (ROOT / "docs" / "site-page.png").write_bytes(shot.read_bytes())
    assert not page.errors, page.errors


def test_cli_page_lists_every_subcommand(page, served):
    from sdlens.cli import build_parser

    page.goto(served + "cli/")
    headings = page.eval_on_selector_all("article h2 code", "els => els.map(e => e.innerText.trim())")
    commands = [c.split()[-1] for c in headings]
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert commands == list(sub.choices), headings
    assert "attend" in commands
    assert "usage: sdlens attend" in page.inner_text("article")


def test_notebook_page_shows_its_outputs(page, served, site):
    """A notebook page shows every picture its notebook holds (none for a stripped one, many once executed)."""
    source = json.loads((site / "notebooks" / "01_start_here" / "01_start_here.ipynb").read_text())
    pictures = sum("image/png" in out.get("data", {}) for cell in source["cells"] for out in cell.get("outputs", []))
    page.goto(served + "notebooks/01_start_here/")
    assert "Start here" in page.title()
    shown = page.eval_on_selector_all("article img[src^='data:image/png']", "els => els.length")
    assert shown == pictures
    assert page.eval_on_selector_all("article a[href$='GLOSSARY/']", "els => els.length") > 0  # the glossary's page
    assert not page.errors, page.errors

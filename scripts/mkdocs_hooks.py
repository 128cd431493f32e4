"""MkDocs hooks for the documentation site (``mkdocs.yml``: ``hooks``): the pages that are made at build time
from the sources they describe, so that none of them can go stale.

- ``cli.md``: ``sdlens --help`` and ``sdlens COMMAND --help`` for every subcommand, from ``sdlens.cli.build_parser``;
- the classroom notebooks: every ``notebooks/*.ipynb``, ``notebooks/solutions/*.ipynb`` and ``notebooks/GLOSSARY.md``
  is a page under ``notebooks/``, listed in the nav's ``Notebooks`` section; a copy under ``docs/notebooks/``
  (the executed notebooks that ``scripts/build_docs.py`` puts there) is used instead of the committed, stripped
  file, and is a warning (an error under ``--strict``) if its cells are not the committed notebook's; the
  notebooks' links to each other and to the glossary are pointed at their pages;
- ``<!-- readme: opening -->`` and ``<!-- readme: HEADING -->`` in a page are replaced by the README's text
  before its first ``## `` heading and up to ``## Where``, or by the section under that heading.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
HELP_WIDTH = 100  # columns of the rendered --help, whatever the terminal that builds the site

log = logging.getLogger("mkdocs.plugins.sdlens")


# ---------------------------------------------------------------- the CLI reference
def _help(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` at a fixed width (argparse otherwise reads the terminal's)."""
    cls = parser.formatter_class
    parser.formatter_class = lambda prog: cls(prog, width=HELP_WIDTH)
    try:
        return parser.format_help()
    finally:
        parser.formatter_class = cls


def cli_reference() -> str:
    """The CLI reference page (markdown): the top-level help, then each subcommand's help, in the parser's order."""
    from sdlens.cli import build_parser

    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = [
        "# Command line",
        "",
        "Every `sdlens` subcommand's `--help`, rendered from the argument parser (`sdlens/cli.py`) when the site "
        "is built.",
        "",
        "```text",
        _help(parser).rstrip(),
        "```",
        "",
    ]
    for name, subparser in sub.choices.items():
        lines += [f"## `sdlens {name}`", ""]
        if summaries.get(name):
            lines += [summaries[name][0].upper() + summaries[name][1:] + ".", ""]
        lines += ["```text", _help(subparser).rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the notebooks
def notebook_sources() -> list[Path]:
    """The classroom series as the site shows it: the numbered notebooks, the solutions, the glossary."""
    return (
        sorted(NOTEBOOKS.glob("*.ipynb"))
        + sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))
        + [NOTEBOOKS / "GLOSSARY.md"]
    )


def on_config(config):
    """Every notebook under the nav's ``Notebooks`` section: the numbered ones, then ``Solutions`` and the glossary."""
    section = next((item for item in config.nav or [] if isinstance(item, dict) and "Notebooks" in item), None)
    if section is None:
        log.warning("mkdocs.yml's nav has no 'Notebooks' section for the classroom notebooks")
        return config
    pages = ["notebooks/" + path.relative_to(NOTEBOOKS).as_posix() for path in notebook_sources()]
    overview = section["Notebooks"] if isinstance(section["Notebooks"], list) else [section["Notebooks"]]
    section["Notebooks"] = [
        *overview,
        *(page for page in pages if page.count("/") == 1 and page.endswith(".ipynb")),
        {"Solutions": [page for page in pages if page.startswith("notebooks/solutions/")]},
        {"Glossary": "notebooks/GLOSSARY.md"},
    ]
    return config


def _cells(path: Path) -> list[tuple[str, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in cells]


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    for path in notebook_sources():
        uri = "notebooks/" + path.relative_to(NOTEBOOKS).as_posix()
        copy = files.get_file_from_path(uri)
        if copy is not None and path.suffix == ".ipynb" and _cells(Path(copy.abs_src_path)) != _cells(path):
            log.warning(f"docs/{uri} is not an executed copy of {path.relative_to(ROOT)} as it is now (other cells): "
                        "run python scripts/build_docs.py, or delete docs/notebooks/")
        if copy is None:  # no executed copy in docs/notebooks/: the committed file
            # a File read from the repository root (mkdocs-jupyter's pages need a src_dir, which File.generated lacks)
            files.append(File(uri, src_dir=str(ROOT), dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files


_HREF = re.compile(r'href="([^":#?]+\.(?:md|ipynb))(#[^"]*)?"')


def on_page_content(html: str, page, config, files: Files) -> str:
    """Point a notebook's relative links to other notebooks and to the glossary at their pages."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html

    def link(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match[1]))
        file = files.get_file_from_path(target)
        if file is None:
            log.warning(f"{page.file.src_uri} links to {match[1]}, which is not a page of the site")
            return match[0]
        return f'href="{file.url_relative_to(page.file)}{match[2] or ""}"'

    return _HREF.sub(link, html)


# ---------------------------------------------------------------- text from the README
_README_MARK = re.compile(r"<!-- readme: (.+?) -->")


def readme_part(name: str) -> str:
    """The README's opening (``opening``: its title, first paragraphs and ``## Two commands``), or the section
    under the heading ``name``, without the heading; image paths made relative to ``docs/``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    if name == "opening":
        end = next(i for i, line in enumerate(lines) if line.startswith("## ") and line != "## Two commands")
        part = lines[1:end]  # the title is the page's own
    else:
        level = name.split(" ", 1)[0]
        try:
            start = lines.index(name) + 1
        except ValueError:
            raise ValueError(f"README.md has no heading {name!r}") from None
        end = next(
            (i for i in range(start, len(lines))
             if lines[i].startswith("#") and len(lines[i].split(" ", 1)[0]) <= len(level)),
            len(lines),
        )
        part = lines[start:end]
    return "\n".join(part).replace("](docs/", "](").strip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return _README_MARK.sub(lambda m: readme_part(m[1]), markdown)

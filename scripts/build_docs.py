"""Build the documentation site into ``site/``: the classroom notebooks with their outputs, then ``mkdocs build --strict``.

    python scripts/build_docs.py                 # after `pip install -e ".[docs]"` (and ".[test]" to execute notebooks)

The notebooks are committed without outputs. The site shows them executed: each one is taken from the
folder where the notebook tests left it (``SDLENS_EXECUTED_NOTEBOOKS=build/notebooks python -m pytest``,
see ``tests/test_notebooks.py``) when that copy has exactly the committed notebook's cells, and is
executed here otherwise, the way the tests run it (a fresh ``python3`` kernel of this Python, in
``notebooks/``, offline, 600 s per cell; this needs the test dependencies). The executed copies go to
``docs/notebooks/`` (ignored by git), where the site's hook (``scripts/mkdocs_hooks.py``) prefers them to
the stripped files.

``--no-execute`` executes nothing: a notebook with no executed copy is shown without outputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
DOCS_NOTEBOOKS = ROOT / "docs" / "notebooks"


def notebooks() -> list[Path]:
    """The classroom notebooks the site shows (the same list the notebook tests run)."""
    return sorted(NOTEBOOKS.glob("*.ipynb")) + sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def executed_copy(path: Path, folder: Path):
    """The executed copy of the notebook ``path`` in ``folder`` and "", or None and why it cannot be used."""
    import nbformat

    copy = folder / path.relative_to(NOTEBOOKS)
    if not copy.exists():
        return None, "no executed copy"
    executed = nbformat.read(copy, as_version=4)
    if _cells(executed) != _cells(nbformat.read(path, as_version=4)):
        return None, f"the executed copy ({copy}) has other cells than the committed notebook"
    return executed, ""


def execute(path: Path, target: Path) -> None:
    """Run the notebook as tests/test_notebooks.py does and write it, with its outputs, to ``target``."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_notebooks import read_notebook, run_notebook
    finally:
        sys.path.remove(str(ROOT / "tests"))
    seconds = run_notebook(read_notebook(path), save_to=target)
    print(f"  executed {path.relative_to(ROOT)} in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executed", type=Path, default=Path(os.environ.get("SDLENS_EXECUTED_NOTEBOOKS", "build/notebooks")),
                        help="where the notebook tests left the executed notebooks (default: "
                        "$SDLENS_EXECUTED_NOTEBOOKS, else build/notebooks), relative to the repository root")
    parser.add_argument("--no-execute", action="store_true", help="execute no notebook (those without an "
                        "executed copy are shown without outputs)")
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="where the site goes (default: site/)")
    args = parser.parse_args(argv)
    import nbformat

    executed_dir = ROOT / args.executed
    shutil.rmtree(DOCS_NOTEBOOKS, ignore_errors=True)
    for path in notebooks():
        target = DOCS_NOTEBOOKS / path.relative_to(NOTEBOOKS)
        executed, why = executed_copy(path, executed_dir)
        if executed is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(executed, target)
            print(f"  {path.relative_to(ROOT)}: the tests' executed copy")
        elif args.no_execute:
            print(f"  {path.relative_to(ROOT)}: {why}; shown without outputs")
        else:
            print(f"  {path.relative_to(ROOT)}: {why}; executing it")
            execute(path, target)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(args.site.resolve())]
    print(" ".join(command[2:]))
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

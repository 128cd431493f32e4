"""Strip the classroom notebooks of outputs, execution counts and run-specific metadata, in place.

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb
    python scripts/strip_notebooks.py a.ipynb b.ipynb # these
    python scripts/strip_notebooks.py --check         # list what is not stripped; exit 1 if any

The tests (tests/test_notebooks.py) run ``problems`` on every committed notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# Cell metadata that a run or an editor writes, and that would make every commit of a notebook noisy.
RUN_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")
RUN_NOTEBOOK_METADATA = ("widgets",)  # saved widget state


def problems(nb) -> list[str]:
    """What keeps ``nb`` (a notebook node) from being stripped; empty when it is."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if cell.get("outputs"):
                found.append(f"cell {i} has outputs")
            if cell.get("execution_count") is not None:
                found.append(f"cell {i} has an execution count")
        found += [f"cell {i} has metadata {k!r}" for k in RUN_CELL_METADATA if k in cell.get("metadata", {})]
        if cell.cell_type == "markdown" and cell.get("attachments"):
            found.append(f"cell {i} has attachments")
    found += [f"notebook metadata {k!r}" for k in RUN_NOTEBOOK_METADATA if k in nb.metadata]
    return found


def strip(nb):
    """``nb`` with no outputs, execution counts or run metadata (modified in place and returned)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for k in RUN_CELL_METADATA:
            cell.metadata.pop(k, None)
    for k in RUN_NOTEBOOK_METADATA:
        nb.metadata.pop(k, None)
    if "language_info" in nb.metadata:  # a run writes the Python version here; keep only the language
        nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if a notebook is not stripped")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOK_DIR.glob("*.ipynb")) + sorted(NOTEBOOK_DIR.glob("solutions/*.ipynb"))
    bad = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        found = problems(nb)
        if not found:
            continue
        if args.check:
            bad += 1
            print(f"{path}: {'; '.join(found)}")
        else:
            nbformat.write(strip(nb), path)
            print(f"stripped {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

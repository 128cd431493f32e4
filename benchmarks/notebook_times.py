"""Wall time of each classroom notebook, run top to bottom in a fresh kernel, offline.

    python benchmarks/notebook_times.py                      # every notebooks/*.ipynb
    python benchmarks/notebook_times.py notebooks/03_diffusion.ipynb

Each notebook runs exactly as the tests run it (tests/test_notebooks.py: a fresh ``python3``
kernel of this Python, cwd = notebooks/, HF_HUB_OFFLINE=1, the network guard), so the times
are those CI sees. The target is well under 2 minutes per notebook on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_notebooks import NOTEBOOKS, read_notebook, run_notebook  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    args = ap.parse_args()
    paths = [p.resolve() for p in args.paths] or NOTEBOOKS
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    failed = 0
    rows = []
    for path in paths:
        start = time.perf_counter()
        try:
            seconds = run_notebook(read_notebook(path))
            status = "ok"
        except Exception as e:  # report and go on with the next notebook
            seconds, status = time.perf_counter() - start, f"FAILED: {type(e).__name__}"
            failed += 1
        rows.append((path.name, seconds, status))
        print(f"{path.name:<40} {seconds:6.1f} s  {status}", flush=True)
    print(f"{'total':<40} {sum(r[1] for r in rows):6.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

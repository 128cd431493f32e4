"""The classroom notebooks: each one runs top to bottom, offline, in a fresh kernel; all are committed stripped.

Every ``notebooks/*.ipynb`` (and the teachers' ``notebooks/solutions/*.ipynb``) is executed with nbclient in a new ``python3`` kernel of the Python
that runs the tests, with ``cwd = notebooks/`` and ``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1``.
A network guard is prepended to the notebook in memory (the file is not touched): any socket
connection to an address that is not loopback raises, and a last cell, also added in memory,
fails the run if any cell tried, even where a library caught the error and carried on.

The wall time of each notebook is printed at the end of the run (see ``conftest.py``);
``python benchmarks/notebook_times.py`` prints the same table without pytest.

With ``SDLENS_EXECUTED_NOTEBOOKS=DIR`` set (a path relative to the repository root, or absolute), each
notebook that runs is also written to ``DIR`` with its outputs (``DIR/01_start_here.ipynb``,
``DIR/solutions/...``; without the guard cells), for the documentation site (``scripts/build_docs.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb")) + sorted((NOTEBOOK_DIR / "solutions").glob("*.ipynb"))
TIMEOUT_PER_CELL = 600  # seconds; a whole notebook should take well under 2 minutes on 2 CPU cores

# Prepended to every notebook. Loopback stays open (the kernel's own channels use ZeroMQ, which does
# not go through Python's socket module anyway); everything else raises NetworkBlocked and is noted.
NETWORK_GUARD = '''\
import ipaddress as _ipaddress
import socket as _socket

_SDLENS_NET_ATTEMPTS = []


class NetworkBlocked(RuntimeError):
    """A notebook tried to reach the network; the classroom notebooks must run offline."""


def _sdlens_is_local(host):
    if host in ("localhost", "", None):
        return True
    try:
        return _ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _sdlens_guard(method):
    def guarded(self, address, *args, **kwargs):
        if self.family in (_socket.AF_INET, _socket.AF_INET6) and not _sdlens_is_local(address[0]):
            _SDLENS_NET_ATTEMPTS.append(repr(address))
            raise NetworkBlocked(f"network access blocked in the notebook tests: connect to {address!r}")
        return method(self, address, *args, **kwargs)

    return guarded


def _sdlens_guard_getaddrinfo(original):
    def guarded(host, *args, **kwargs):
        if not _sdlens_is_local(host.decode() if isinstance(host, bytes) else host):
            _SDLENS_NET_ATTEMPTS.append(repr(host))
            raise NetworkBlocked(f"network access blocked in the notebook tests: name lookup of {host!r}")
        return original(host, *args, **kwargs)

    return guarded


_socket.socket.connect = _sdlens_guard(_socket.socket.connect)
_socket.socket.connect_ex = _sdlens_guard(_socket.socket.connect_ex)
_socket.getaddrinfo = _sdlens_guard_getaddrinfo(_socket.getaddrinfo)
'''

# Appended to every notebook: fails if any cell tried the network, even if the error was caught.
NETWORK_CHECK = """\
assert not _SDLENS_NET_ATTEMPTS, f"cells tried to reach the network: {_SDLENS_NET_ATTEMPTS}"
"""


def kernel_manager():
    """A KernelManager whose ``python3`` kernel is this Python (``sys.executable``), whatever kernelspecs exist."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def executed_dir() -> Path | None:
    """Where executed notebooks are kept (``$SDLENS_EXECUTED_NOTEBOOKS``, relative to the repository root), or None."""
    folder = os.environ.get("SDLENS_EXECUTED_NOTEBOOKS")
    return ROOT / folder if folder else None


def run_notebook(nb, cwd: Path = NOTEBOOK_DIR, timeout: int = TIMEOUT_PER_CELL, save_to: Path | None = None) -> float:
    """Execute the notebook node ``nb`` (guarded) in a fresh kernel; returns its wall time in seconds.

    Raises nbclient's ``CellExecutionError`` on the first failing cell. With ``save_to``, the executed
    notebook (outputs, without the guard cells) is written there once it has run through.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.from_dict(nb)  # a copy: the guard cells never reach the caller's notebook
    nb.cells.insert(0, nbformat.v4.new_code_cell(NETWORK_GUARD))
    nb.cells.append(nbformat.v4.new_code_cell(NETWORK_CHECK))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    km = kernel_manager()
    client = NotebookClient(
        nb,
        km=km,
        timeout=timeout,
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env, cwd=str(cwd))
    finally:
        # nbclient leaves a kernel manager it was given running: stop the kernel ourselves
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    if save_to is not None:
        executed = client.nb
        executed.cells = executed.cells[1:-1]  # the guard and the check were added above
        save_to.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(executed, save_to)
    return seconds


def read_notebook(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_offline(path: Path, notebook_times) -> None:
    """The notebook runs top to bottom in a fresh kernel with no error and no network."""
    pytest.importorskip("nbclient")
    keep = executed_dir()
    try:
        notebook_times[path.name] = run_notebook(
            read_notebook(path), save_to=keep / path.relative_to(NOTEBOOK_DIR) if keep else None
        )
    except Exception:
        notebook_times[path.name] = float("nan")
        raise


def _tiny_notebook(source: str):
    import nbformat

    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])


CONNECT = "import socket\ns = socket.create_connection(('93.184.216.34', 80), timeout=2)\n"


def test_network_guard_blocks_a_connection(tmp_path: Path) -> None:
    """The guard works: a notebook cell that connects to a public address fails the run."""
    pytest.importorskip("nbclient")
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="NetworkBlocked"):
        run_notebook(_tiny_notebook(CONNECT), cwd=tmp_path, timeout=60)


def test_network_guard_sees_a_swallowed_attempt(tmp_path: Path) -> None:
    """A cell that catches the error still fails the run: the attempt is noted and checked at the end."""
    pytest.importorskip("nbclient")
    from nbclient.exceptions import CellExecutionError

    swallowed = (
        "try:\n"
        + "".join("    " + line + "\n" for line in CONNECT.splitlines())
        + "except Exception:\n    pass\n"
    )
    with pytest.raises(CellExecutionError, match="tried to reach the network"):
        run_notebook(_tiny_notebook(swallowed), cwd=tmp_path, timeout=60)


def test_network_guard_leaves_loopback_open(tmp_path: Path) -> None:
    """Loopback stays reachable (a refused connection to 127.0.0.1 is an OSError, not a block)."""
    pytest.importorskip("nbclient")
    source = (
        "import socket\n"
        "s = socket.socket()\n"
        "s.bind(('127.0.0.1', 0)); s.listen(1)\n"
        "c = socket.create_connection(s.getsockname(), timeout=2)\n"
        "c.close(); s.close()\n"
    )
    run_notebook(_tiny_notebook(source), cwd=tmp_path, timeout=60)


def test_kernel_is_this_python_in_the_given_folder(tmp_path: Path) -> None:
    """The notebooks run in the interpreter that runs the tests (the venv's), in the folder asked for."""
    pytest.importorskip("nbclient")
    source = (
        "import os, sys\n"
        f"assert sys.executable == {sys.executable!r}, sys.executable\n"
        f"assert os.path.samefile(os.getcwd(), {str(tmp_path)!r}), os.getcwd()\n"
        "assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
    )
    run_notebook(_tiny_notebook(source), cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped(path: Path) -> None:
    """Committed notebooks carry no outputs and no execution counts (``python scripts/strip_notebooks.py``)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from strip_notebooks import problems
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    found = problems(read_notebook(path))
    assert not found, f"{path.name} is not stripped: {found}; run `python scripts/strip_notebooks.py`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_real_sd_switch_is_off(path: Path) -> None:
    """A notebook's switch to real Stable Diffusion (a download) is committed switched off."""
    import re

    sources = [c.source for c in read_notebook(path).cells if c.cell_type == "code"]
    on = [
        line
        for src in sources
        for line in src.splitlines()
        if re.match(r"\s*USE_REAL_SD\s*=(?!\s*False\b)", line)
    ]
    assert not on, f"{path.name} sets {on}; commit it with USE_REAL_SD = False"

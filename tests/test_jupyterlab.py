"""The classroom's first notebook in a real JupyterLab, driven by a real browser.

JupyterLab is started on localhost (a free port, a random token, no browser of its own) in a
temporary folder holding a copy of ``notebooks/01_start_here.ipynb``, with its own Jupyter config,
data and runtime folders so that nothing of the machine's Jupyter setup leaks in. Debian's
Chromium (``/usr/bin/chromium``), driven by Playwright, opens the notebook, runs all cells from
the Run menu, waits for the attention explorer (an ipywidgets tree) to render, moves its step
slider with the keyboard, and checks that the picture changes.

Skipped, with the reason, when Chromium, Playwright or JupyterLab is missing (``.ci/run``
installs them, so CI runs it). Playwright never downloads a browser here: it is given Chromium's
path. Everything is local: the kernel runs with HF_HUB_OFFLINE=1 and the browser with no
background networking.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _browser import CHROMIUM, CHROMIUM_ARGS, browser_missing

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_start_here.ipynb"
START_TIMEOUT = 60  # seconds for JupyterLab to answer
KERNEL_TIMEOUT = 120  # seconds for the kernel to start and connect to the page
RUN_TIMEOUT = 300  # seconds for "Run All Cells" to bring up the explorer (~20 s on a quiet 2-core CPU)
CHANGE_TIMEOUT = 30  # seconds for the picture to change after the slider moves


def _requirements() -> str | None:
    """Why the test cannot run here, or None."""
    missing = browser_missing()
    if missing:
        return missing
    try:
        import jupyterlab  # noqa: F401
        import jupyterlab_widgets  # noqa: F401
    except ImportError:
        return "jupyterlab (and jupyterlab_widgets, which ipywidgets 8 brings) is not installed (pip install jupyterlab)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab_server(tmp_path: Path):
    """A JupyterLab on a free localhost port serving a temporary root with a copy of "Start here"."""
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    # Jupyter's own folders, isolated; "python3" is this Python (with sdlens), whatever else is installed.
    jupyter = tmp_path / "jupyter"
    kernel_dir = jupyter / "data" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }))
    token = secrets.token_hex(16)
    port = _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "JUPYTER_PATH": str(jupyter / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "lab-workspaces"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    log = tmp_path / "jupyterlab.log"
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.open_browser=False",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers often run as root
        cmd.append("--allow-root")
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield {"base": base, "token": token, "log": log, "notebook": NOTEBOOK.name}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _image_bytes(page, img) -> bytes:
    """The bytes behind an <img> (ipywidgets 8 shows images as blob: URLs)."""
    src = img.get_attribute("src")
    data = page.evaluate(
        """async (src) => {
            const buf = await (await fetch(src)).arrayBuffer();
            let s = ""; const b = new Uint8Array(buf);
            for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
            return btoa(s);
        }""",
        src,
    )
    return base64.b64decode(data)


def _settled_image_bytes(page, img, quiet: float = 1.0, timeout: float = 30.0) -> bytes:
    """The <img>'s bytes once its src has stopped changing for ``quiet`` seconds.

    Each redraw replaces the blob: URL and revokes the old one, so a picture read while the
    explorer is still redrawing (one redraw per key press) can vanish under the reader.
    """
    deadline = time.monotonic() + timeout
    while True:
        src = img.get_attribute("src")
        time.sleep(quiet)
        if img.get_attribute("src") == src:
            try:
                page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                       timeout=10_000)
                return _image_bytes(page, img)
            except Exception:
                if time.monotonic() > deadline:
                    raise
        elif time.monotonic() > deadline:
            raise TimeoutError("the explorer's picture kept changing")


def _accept_kernel_dialog(page, wait: float = 3.0) -> None:
    """Press "Select" if JupyterLab asks which kernel to use (it keeps the one already chosen)."""
    dialog = page.locator(".jp-Dialog").filter(has_text="Select Kernel")
    try:
        dialog.wait_for(state="visible", timeout=wait * 1000)
    except Exception:
        return  # no dialog: the cells are running
    dialog.locator("button.jp-mod-accept").click()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.notebook
def test_start_here_explorer_in_jupyterlab(jupyterlab_server, tmp_path: Path) -> None:
    """Run All on "Start here" in JupyterLab; the attention explorer renders; its step slider changes the picture."""
    from playwright.sync_api import sync_playwright

    server = jupyterlab_server
    url = f"{server['base']}/lab/tree/{server['notebook']}?token={server['token']}"
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=START_TIMEOUT * 1000)
            # The kernel must be connected before running. The toolbar's kernel name shows up at once
            # (it comes from the notebook's metadata); only the status bar's "| Idle" says the
            # browser holds a live kernel. Running earlier makes JupyterLab ask "Select Kernel"
            # and leave every cell unrun.
            page.locator(".jp-StatusBar-Widget").get_by_text(re.compile(r"\|\s*Idle")).first.wait_for(
                timeout=KERNEL_TIMEOUT * 1000)

            # Run → Run All Cells; should the kernel dialog still appear, accept the notebook's kernel.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
            _accept_kernel_dialog(page)
            # Execution has begun once some input prompt reads [*] or [n].
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-InputPrompt')].some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))",
                timeout=KERNEL_TIMEOUT * 1000,
            )

            # The explorer: the widget tree whose dropdown is labelled "word" and whose slider is labelled "step".
            explorer = page.locator(".jp-OutputArea-output .widget-vbox").filter(
                has=page.locator(".widget-dropdown", has_text="word")
            ).filter(has=page.locator(".widget-slider", has_text="step")).first
            explorer.wait_for(state="attached", timeout=RUN_TIMEOUT * 1000)
            explorer.scroll_into_view_if_needed()     # the notebook may skip laying out cells off screen
            explorer.wait_for(state="visible", timeout=30_000)
            img = explorer.locator("img").first
            img.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=30_000)
            bytes_before = _settled_image_bytes(page, img)
            src_before = img.get_attribute("src")
            assert bytes_before[:8] == b"\x89PNG\r\n\x1a\n", "the explorer's picture is not a PNG"

            # Move the step slider with the keyboard: focus its handle, then step back towards the first step.
            slider = explorer.locator(".widget-slider", has_text="step").first
            handle = slider.locator(".noUi-handle").first
            handle.click()
            for _ in range(6):
                handle.press("ArrowLeft")
            page.wait_for_function(
                "([el, before]) => el.getAttribute('src') !== before",
                arg=[img.element_handle(), src_before],
                timeout=CHANGE_TIMEOUT * 1000,
            )
            bytes_after = _settled_image_bytes(page, img)
            readout = slider.locator(".widget-readout").first.inner_text()
        except Exception:
            page.screenshot(path=str(tmp_path / "jupyterlab.png"), full_page=True)
            outputs = page.locator(".jp-OutputArea-output")
            print(f"{outputs.count()} outputs; the last: {outputs.last.inner_html()[:3000] if outputs.count() else ''}")
            print(f"screenshot: {tmp_path / 'jupyterlab.png'}; page errors: {errors}")
            print(server["log"].read_text()[-3000:])
            raise
        finally:
            browser.close()
    assert bytes_after != bytes_before, "moving the step slider did not change the explorer's picture"
    print(f"step slider moved to {readout!r}; picture changed; {time.monotonic() - started:.0f} s in the browser")

"""Prompt → picture and word maps: the web page in headless Chromium beside PyTorch on this machine.

    python benchmarks/web_speed.py                 # 5 runs each at the page's defaults (25 steps)
    python benchmarks/web_speed.py --repeats 9 --steps 50

Writes the page (``sdlens web``) into a temporary folder, serves it on 127.0.0.1, and times
``window.sdlensDemo.run`` (the page's own clock: text encoder, every UNet call with its maps,
the decoder for the picture and every step's clean estimate, and the maps per word) after one
warm-up run; then the same prompt through the PyTorch pipeline with the trace ``sdlens attend``
takes. Prints the medians.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

import sdlens
from sdlens.commands.attend import generate
from sdlens.web.export import write_page

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle on the left and a blue square on the right"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    pipe = sdlens.load_pipeline("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_page(Path(tmp) / "page", pipe=pipe, seeds=args.repeats + 1)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        web = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
            page.wait_for_function("() => !document.getElementById('generate').disabled", timeout=120_000)
            load = time.perf_counter() - t0
            for seed in range(args.repeats + 1):  # the first is a warm-up
                secs = page.evaluate("async (a) => (await window.sdlensDemo.run(a)).seconds",
                                     {"prompt": PROMPT, "seed": seed, "steps": args.steps, "guidance": 7.5})
                if seed:
                    web.append(secs)
            version = browser.version
            browser.close()
        server.shutdown()
    torch_times = []
    for seed in range(args.repeats + 1):
        t0 = time.perf_counter()
        generate(pipe, PROMPT, steps=args.steps, seed=seed, guidance=7.5, negative=None, size=(64, 64))
        if seed:
            torch_times.append(time.perf_counter() - t0)
    print(f"prompt: {PROMPT!r}, {args.steps} steps, guidance 7.5, CFG batch 2; {torch.get_num_threads()} torch threads")
    print(f"page load (model files from a local server, sessions created): {load:.1f} s")
    print(f"web page (Chromium {version}, onnxruntime-web wasm, 1 thread): median {statistics.median(web):.2f} s "
          f"of {args.repeats} ({', '.join(f'{t:.2f}' for t in web)})")
    print(f"PyTorch (sdlens attend's traced generation): median {statistics.median(torch_times):.2f} s "
          f"of {args.repeats}")


if __name__ == "__main__":
    main()

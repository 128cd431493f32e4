"""Refresh the onnxruntime-web files the web page ships (``sdlens/web/vendor``) from npm.

    python scripts/vendor_ort.py            # npm ci in web/, copy the files, write their checksums

The version is the one pinned in ``web/package.json`` (and locked in ``web/package-lock.json``).
The copied files are committed, so ``sdlens web`` works offline wherever sdlens is installed;
``tests/test_web.py`` checks them against ``sdlens/web/vendor/SHA256SUMS``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
VENDOR = ROOT / "sdlens" / "web" / "vendor"
FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# the npm package declares MIT in package.json and ships no license file: its terms, written out
MIT = """onnxruntime-web {version} (https://github.com/microsoft/onnxruntime), MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def main() -> int:
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    package = WEB / "node_modules" / "onnxruntime-web"
    version = json.loads((package / "package.json").read_text())["version"]
    VENDOR.mkdir(parents=True, exist_ok=True)
    sums = []
    for name in FILES:
        shutil.copyfile(package / "dist" / name, VENDOR / name)
        sums.append(f"{hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()}  {name}")
    meta = json.loads((package / "package.json").read_text())
    if meta.get("license") != "MIT":
        raise SystemExit(f"onnxruntime-web {version} is licensed {meta.get('license')!r}, not MIT: check before vendoring")
    (VENDOR / "LICENSE").write_text(MIT.format(version=version))
    (VENDOR / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (VENDOR / "VERSION").write_text(f"onnxruntime-web {version}\n")
    print(f"onnxruntime-web {version}: {', '.join(FILES)} -> {VENDOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

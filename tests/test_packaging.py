"""The built-in models and the web page ship inside the wheel and work offline from a non-editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys, torch, sdlens
from sdlens.models import BUILTIN
assert sdlens.__file__.startswith(sys.argv[1]), sdlens.__file__   # the installed copy, not the checkout
out = {}
for name in BUILTIN:
    pipe = sdlens.load_pipeline(name, device="cpu")
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    out[name] = [type(pipe).__name__, list(image.shape)]
from sdlens.web.export import write_page
page = write_page(sys.argv[2], seeds=2)   # the page, onnxruntime-web and the exported model, from the install
out["web"] = sorted(p.name for p in page.iterdir())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_wheel_carries_both_models_and_they_load_offline(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("sdlens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("tiny", "tiny-sd3"):
        assert f"sdlens/data/{folder}/model_index.json" in names, folder
    assert "sdlens/data/tiny-sd3/transformer/diffusion_pytorch_model.safetensors" in names
    for name in ("page/index.html", "page/worker.js", "vendor/ort-wasm-simd-threaded.wasm", "vendor/LICENSE"):
        assert f"sdlens/web/{name}" in names, name
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK, str(target), str(tmp_path / "page")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    loaded = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    web = loaded.pop("web")
    assert loaded == {"tiny": ["StableDiffusionPipeline", [64, 64, 3]],
                      "tiny-sd3": ["StableDiffusion3Pipeline", [64, 64, 3]]}
    assert {"index.html", "app.js", "worker.js", "unet.onnx", "model.json", "noise.bin",
            "ort-wasm-simd-threaded.wasm", "ort.wasm.min.mjs"} <= set(web)

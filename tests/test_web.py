"""The classroom page (``sdlens web``): the exported graphs, the sampler's coefficients, and the page
itself in Chromium.

References are computed another way: diffusers' own scheduler stepping (for the coefficients),
the PyTorch pipeline that ``sdlens attend`` runs (for the graphs run by onnxruntime in Python, and
for the page run by onnxruntime-web in the browser), ``sdlens.world.score`` (for the picture).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _browser import chromium_page, serve

import sdlens
from sdlens.errors import WebError
from sdlens.web import schedule
from sdlens.web.export import VENDOR, write_page

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on the left and a blue square on the right", "a big green triangle",
           "a small blue circle at the top"]


@pytest.fixture(scope="module")
def tiny():
    return sdlens.load_pipeline("tiny")


@pytest.fixture(scope="module")
def page_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "page"
    write_page(out, pipe=tiny, seeds=8)
    return out


def test_coefficients_step_as_diffusers_scheduler(tiny):
    """The page's update, x = A x + B m0 + C m1, is DPM-Solver++'s step, for short and long runs."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) * 0.3
    for steps in (1, 2, 3, 14, 15, 25, 50):
        coef = schedule.coefficients(copy.deepcopy(tiny.scheduler), steps)
        sched = copy.deepcopy(tiny.scheduler)
        sched.set_timesteps(steps)
        assert coef["timestep"] == [float(t) for t in sched.timesteps]
        x0 = torch.randn(1, 4, 16, 16, generator=g)

        def model(x, t):  # any deterministic noise estimate will do
            return torch.einsum("ij,bjhw->bihw", weight, torch.as_tensor(x, dtype=torch.float32)) * (0.5 + t / 2000)

        x = x0.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, float(t)), t, x).prev_sample
        ours = schedule.apply(coef, x0.double(), lambda x, t: model(x.float(), t).double())
        torch.testing.assert_close(ours.float(), x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_other_samplers_are_refused(tiny):
    from diffusers import DDIMScheduler

    with pytest.raises(WebError, match="DPM-Solver"):
        schedule.coefficients(DDIMScheduler.from_config(tiny.scheduler.config), 10)


def test_vendored_onnxruntime_web_is_what_its_checksums_say():
    sums = dict(reversed(line.split("  ")) for line in (VENDOR / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"}
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    pinned = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    assert (VENDOR / "VERSION").read_text().split() == ["onnxruntime-web", pinned]


def _python_page(folder: Path, tokenizer, prompt: str, seed: int, steps: int, guidance: float):
    """The page's pipeline with onnxruntime in Python: ``(image (H, W, 3), per-step map groups)``."""
    import onnxruntime as ort

    meta = json.loads((folder / "model.json").read_text())
    run = {k: ort.InferenceSession(str(folder / f"{k}.onnx")).run for k in ("text_encoder", "unet", "vae_decoder")}
    noise = np.fromfile(folder / "noise.bin", dtype="<f4").reshape(meta["noise"]["seeds"], *meta["latent"])
    ids = [tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids for p in ("", prompt)]
    context = run["text_encoder"](None, {"ids": np.array(ids, dtype=np.int64)})[0]
    groups = []

    def model(x, t):
        out = run["unet"](None, {"sample": np.concatenate([x, x]).astype(np.float32),
                                 "timestep": np.array([t], np.float32), "context": context})
        groups.append(out[1:])
        return out[0][:1] + guidance * (out[0][1:] - out[0][:1])

    x = schedule.apply(meta["schedules"][str(steps)], noise[seed][None], model)
    image = run["vae_decoder"](None, {"latents": x.astype(np.float32)})[0][0].transpose(1, 2, 0)
    return image, groups, meta


def _word_map(groups, meta, slots, size=(64, 64)) -> torch.Tensor:
    n = sum(g["layers"] for g in meta["mapGroups"])
    total = 0
    for step in groups:
        for out, g in zip(step, meta["mapGroups"]):
            m = torch.tensor(out[:, slots].mean(1)).reshape(*g["size"])
            total = total + g["layers"] / n * torch.nn.functional.interpolate(
                m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return total / len(groups)


def test_exported_graphs_give_the_pytorch_pipelines_picture_and_maps(tiny, page_dir):
    from sdlens.commands.attend import generate

    prompt, steps = PROMPTS[0], 10
    image, groups, meta = _python_page(page_dir, tiny.tokenizer, prompt, seed=3, steps=steps, guidance=7.5)
    tr, ref = generate(tiny, prompt, steps=steps, seed=3, guidance=7.5, negative=None, size=(64, 64))
    assert np.abs(image - np.asarray(ref) / 255.0).mean() < 0.003  # 8-bit rounding of the reference
    for word in ("red", "circle", "square"):
        slots = tr.tokenization().word_tokens[tr.word_index(word)]
        torch.testing.assert_close(_word_map(groups, meta, slots), tr.word_map(word), rtol=1e-3, atol=1e-5)
    assert len(meta["schedules"]) == 50 and meta["noise"]["seeds"] == 8
    assert [g["layer"] for g in meta["mapGroups"]] == tr.layers_of("cross")  # one output per layer
    assert [tuple(g["size"]) for g in meta["mapGroups"]] == [tr.map_size(n) for n in tr.layers_of("cross")]


def test_web_command_refuses_bad_arguments_and_leaves_nothing(tmp_path, capsys):
    from sdlens.cli import main

    assert main(["web", "--out", str(tmp_path / "p"), "--model", "tiny-sd3"]) == 2
    assert "valid: 'tiny'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["web", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["web", "--out", str(tmp_path / "q"), "--seeds", "0"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no folder, no temporary left


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def served(page_dir):
    """The page folder on a plain static server on 127.0.0.1 (any free port)."""
    with serve(page_dir) as url:
        yield url + "index.html"


RUN_JS = """async (args) => {
  const r = await window.sdlensDemo.run(args);
  const maps = {};
  for (const w of r.words) maps[w] = Array.from(r.maps[w]);
  return {width: r.width, height: r.height, words: r.words, maps, image: Array.from(r.image),
          steps: r.steps.length, seconds: r.seconds, mapSize: r.mapSize,
          x0: r.steps.map(s => s.x0.length), stepWords: Object.keys(r.steps[0].maps)};
}"""


@pytest.mark.slow
@pytest.mark.browser
def test_page_in_chromium(tiny, served, tmp_path):
    from sdlens.commands.attend import generate
    from sdlens.world import score

    with chromium_page() as page:
        errors = page.errors
        page.goto(served)
        page.wait_for_function("() => !document.getElementById('generate').disabled", timeout=120_000)

        # a student's run: type, press Generate, wait for the picture and its maps
        page.fill("#prompt", "a green square on the right")
        page.click("#generate")
        page.wait_for_selector("#maps figure[data-word='square']", timeout=120_000)
        rgba = page.evaluate("""() => { const c = document.getElementById('picture');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
        picture = np.array(rgba, dtype=np.uint8).reshape(64, 64, 4)[..., :3]
        assert score(picture, "a green square on the right")["all"]
        labels = page.eval_on_selector_all("#maps figure", "els => els.map(e => e.dataset.word)")
        assert labels == ["a", "green", "square", "on", "the", "right"]

        # the step slider changes the maps (and the clean-picture estimate)
        first = page.eval_on_selector("#maps figure[data-word='square'] canvas", "c => c.toDataURL()")
        page.fill("#step", "0")
        page.dispatch_event("#step", "input")
        assert page.eval_on_selector("#maps figure[data-word='square'] canvas", "c => c.toDataURL()") != first
        assert "step 1 of 25" in page.inner_text("#step-label")
        page.fill("#step", "25")
        page.dispatch_event("#step", "input")
        shot = tmp_path / "web-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("SDLENS_DOCS_SCREENSHOT"):  # refresh the README's picture
            (ROOT / "docs").mkdir(exist_ok=True)
            (ROOT / "docs" / "web-page.png").write_bytes(shot.read_bytes())

        # readable on a phone: nothing wider than the screen
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.set_viewport_size({"width": 1200, "height": 1400})

        # a word outside the model's vocabulary: the message, not a crash
        page.fill("#prompt", "a red dog")
        page.dispatch_event("#prompt", "input")
        assert "“dog” is not a word this model knows" in page.inner_text("#message")
        page.click("#generate")
        page.wait_for_function("() => !document.getElementById('generate').disabled")
        assert "“dog” is not a word" in page.inner_text("#message")

        # run() agrees with sdlens attend (PyTorch) for three prompts
        for seed, prompt in enumerate(PROMPTS):
            got = page.evaluate(RUN_JS, {"prompt": prompt, "seed": seed, "steps": 25, "guidance": 7.5})
            tr, ref = generate(tiny, prompt, steps=25, seed=seed, guidance=7.5, negative=None, size=(64, 64))
            image = np.array(got["image"], dtype=np.float64).reshape(64, 64, 4)[..., :3] / 255
            assert np.abs(image - np.asarray(ref) / 255).mean() <= 0.02, prompt
            assert got["words"] == tr.tokenization().word_labels
            assert got["mapSize"] == [64, 64] and got["x0"] == [64 * 64 * 4] * 25
            assert set(got["words"]) <= set(got["stepWords"])
            for word in got["words"]:
                ours = np.array(got["maps"][word])
                assert np.corrcoef(ours, tr.word_map(word).flatten().numpy())[0, 1] >= 0.95, (prompt, word)
    assert not errors, errors

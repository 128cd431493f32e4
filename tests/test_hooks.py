"""The hook layer: one processor, named points, controllers; capture is one controller among others.

Also: the package's imports run one way (no cycles), and the trace is a plain read-only result.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import sdlens
from sdlens.hooks import Controller, attach
from sdlens.hooks.rows import Row, row_layout
from sdlens.result import AttentionTrace, TraceInfo
from sdlens.tokens import load_clip_tokenizer, tokenize

PROMPT = "a red circle on the left"
PACKAGE = Path(sdlens.__file__).resolve().parent


def run(pipe, prompt=PROMPT, steps=3, seed=0):
    return pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def cross_layers(run_state):
    return [i.name for i in run_state.layers if i.role == "cross"]


class ScaleToken(Controller):
    """A probability editor: multiplies every cross-attention probability of key ``slot`` by ``factor``."""

    edits = True

    def __init__(self, slot: int, factor: float) -> None:
        self.slot, self.factor, self.calls = slot, factor, 0

    def layers(self, run):
        return cross_layers(run)

    def probs(self, call, p):
        self.calls += 1
        p = p.clone()
        p[..., self.slot] *= self.factor
        return p


class Watch(Controller):
    """An observer at every point: counts what it sees, changes nothing."""

    def __init__(self) -> None:
        self.seen = {"qkv": 0, "probs": 0, "out": 0}

    def layers(self, run):
        return [i.name for i in run.layers]

    def qkv(self, call, q, k, v):
        self.seen["qkv"] += 1

    def probs(self, call, p):
        self.seen["probs"] += 1

    def out(self, call, out):
        self.seen["out"] += 1


# ---------------------------------------------------------------- the import graph
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], type_only: bool = False) -> set[str]:
    """Modules of the package that ``path`` imports (at any depth of its code; under TYPE_CHECKING
    only with ``type_only``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if not type_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _fail_on_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_package_imports_have_no_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    assert graph["sdlens.capture.controller"] >= {"sdlens.hooks.processor", "sdlens.result.attention_trace"}
    _fail_on_cycle(graph)
    # the layers run one way: the hooks know nothing of capture, results or pictures
    for m, deps in graph.items():
        if m.startswith("sdlens.hooks"):
            assert not {d for d in deps if d.startswith(("sdlens.capture", "sdlens.result", "sdlens.viz"))}, m
        if m.startswith("sdlens.result"):
            assert not {d for d in deps if d.startswith(("sdlens.capture", "sdlens.viz", "sdlens.widgets"))}, m
        if m.startswith("sdlens.analysis"):  # the measures are below what draws or records them
            assert not {d for d in deps if d.startswith(("sdlens.viz", "sdlens.widgets", "sdlens.sweep"))}, m


def test_the_hooks_have_no_cycle_even_in_type_annotations():
    """The processor names ``Run`` for its types, and ``Run`` knows nothing of the processor."""
    files = {_module_name(p): p for p in (PACKAGE / "hooks").rglob("*.py")}
    graph = {m: _imports(p, set(files), type_only=True) for m, p in files.items()}
    assert "sdlens.hooks.run" in graph["sdlens.hooks.processor"]
    _fail_on_cycle(graph)


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The test above can fail: two modules importing each other are found."""
    pkg = tmp_path / "sdlens"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    files = {_module_name(p): p for p in pkg.rglob("*.py")}
    assert _imports(files["sdlens.sub.a"], set(files)) == {"sdlens.sub.b"}
    assert _imports(files["sdlens.sub.b"], set(files)) == {"sdlens.sub.a"}


# ---------------------------------------------------------------- controllers on the processor
def test_an_editor_beside_capture_scaling_by_one_changes_nothing(sd1_pipe):
    pipe = sd1_pipe
    before = dict(pipe.unet.attn_processors)
    plain = run(pipe)
    with sdlens.trace(pipe, dtype=torch.float32) as alone:
        run(pipe)
    editor = ScaleToken(slot=2, factor=1.0)
    tr = sdlens.trace(pipe, dtype=torch.float32)
    tr.attachment.controllers.append(editor)  # capture and the editor on the same hooks
    with tr as both:
        edited = run(pipe)
    assert editor.calls == 3 * len(cross_layers(tr.attachment.run))  # every cross layer at every step
    assert abs(edited - plain).max() <= 1e-4  # explicit softmax and p @ v instead of SDPA: equal up to rounding
    assert both.keys() == alone.keys() and both.keys()
    for kind, layer in alone.keys():  # what capture keeps from the explicit path equals the SDPA path's maps
        torch.testing.assert_close(both.maps(layer, kind), alone.maps(layer, kind), atol=1e-5, rtol=1e-4)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_scaling_a_token_by_zero_changes_the_image_and_what_capture_sees(sd1_pipe):
    pipe = sd1_pipe
    plain = run(pipe)
    tr = sdlens.trace(pipe, dtype=torch.float32, heads="all")
    tr.attachment.controllers.append(ScaleToken(slot=2, factor=0.0))
    with tr as edited_trace:
        edited = run(pipe)
    assert abs(edited - plain).max() > 1e-3  # 10x what the explicit path alone moves (<= 1e-4, above)
    for layer in edited_trace.layers_of("cross"):  # capture keeps the probabilities the model used
        m = edited_trace.maps(layer)
        assert m[..., 2].abs().max() == 0 and m[..., 3].min() > 0
    with attach(pipe, [ScaleToken(slot=2, factor=0.0)]):  # the editor alone gives the same image
        alone = run(pipe)
    assert abs(alone - edited).max() <= 1e-6


def test_observers_keep_the_sdpa_path_bit_identical(sd1_pipe):
    pipe = sd1_pipe
    plain = run(pipe)
    watch = Watch()
    with attach(pipe, [watch]) as state:
        watched = run(pipe)
    assert (watched == plain).all()
    n_calls = 3 * len(state.layers)
    assert watch.seen == {"qkv": n_calls, "probs": 0, "out": n_calls}  # no editor: no explicit probabilities


def test_editors_at_qkv_and_out_replace_the_tensors(sd1_pipe):
    pipe = sd1_pipe

    class ZeroValues(Controller):
        edits = True

        def layers(self, run):
            return cross_layers(run)

        def qkv(self, call, q, k, v):
            return q, k, torch.zeros_like(v)

    class DropOutput(Controller):
        edits = True

        def layers(self, run):
            return cross_layers(run)

        def out(self, call, out):
            return torch.zeros_like(out)

    with attach(pipe, [ZeroValues()]):
        a = run(pipe)
    with attach(pipe, [DropOutput()]):
        b = run(pipe)
    plain = run(pipe)
    assert abs(a - plain).max() > 1e-3 and abs(b - plain).max() > 1e-3 and abs(a - b).max() > 1e-3


def test_editing_a_layer_run_by_another_processor_is_refused_and_restored(sd1_pipe):
    pipe = sd1_pipe
    original = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        before = dict(pipe.unet.attn_processors)
        with pytest.raises(sdlens.CaptureError, match="AttnProcessor2_0"):
            with attach(pipe, [ScaleToken(2, 0.5)]):
                run(pipe, steps=1)
        after = pipe.unet.attn_processors
        assert all(after[k] is before[k] for k in before)
        assert not pipe.unet._forward_pre_hooks and "encode_prompt" not in vars(pipe)
    finally:
        pipe.unet.set_attn_processor(dict(original))
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())


def test_attach_refuses_what_is_not_a_controller_and_a_second_attachment(sd1_pipe):
    with pytest.raises(sdlens.CaptureError, match="Controller"):
        attach(sd1_pipe, [object()])
    with attach(sd1_pipe, [Watch()]):
        with pytest.raises(sdlens.CaptureError, match="already"):
            with attach(sd1_pipe, [Watch()]):
                pass


def test_one_vae_factor_and_latent_size_for_pipelines_and_bare_denoisers(sd1_pipe):
    from types import SimpleNamespace

    from sdlens.hooks.layers import latent_size_of, vae_factor

    side = sd1_pipe.unet.config.sample_size
    assert vae_factor(sd1_pipe) == sd1_pipe.vae_scale_factor
    assert vae_factor(sd1_pipe.unet) == vae_factor(None) == 1  # no VAE: the image is the latent
    assert vae_factor(SimpleNamespace(unet=sd1_pipe.unet)) == 8  # a pipeline that does not say: diffusers' 8
    f = sd1_pipe.vae_scale_factor
    assert latent_size_of(sd1_pipe) == (side, side) == latent_size_of(sd1_pipe.unet)
    assert latent_size_of(sd1_pipe, 4 * f, 6 * f) == (4, 6) and latent_size_of(sd1_pipe.unet, 4, 6) == (4, 6)


def test_row_layout_of_a_cfg_batch():
    layout = row_layout(8, {"prompt": ["a", "b"], "num_images_per_prompt": 2, "negative_prompt": "x"}, True)
    assert layout.cfg and layout.per_half == 4 and layout.negative_prompts == ("x", "x")
    assert layout.rows[:4] == tuple(Row("uncond", p, i) for p in (0, 1) for i in (0, 1))
    assert layout.indices(["cond"]) == [4, 5, 6, 7] and layout.indices(["uncond", "cond"]) == list(range(8))
    bare = row_layout(2, None, True)  # a denoiser called directly: halves from the batch alone
    assert bare.cfg and [r.half for r in bare.rows] == ["uncond", "cond"] and bare.prompts == ()


# ---------------------------------------------------------------- the trace as a plain result
def _hand_made_trace():
    """A trace made with the public constructor: one 2×2 layer, two steps, keys = 77 CLIP slots."""
    tok = tokenize("a red circle", load_clip_tokenizer())
    maps = torch.zeros(2, 1, 1, 4, 77)  # (steps, rows, heads, h·w, keys)
    maps[..., 0] = 0.5
    maps[0, 0, 0, :, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # "red" at the top-left pixel, step 0
    maps[1, 0, 0, :, 2] = torch.tensor([0.0, 0.0, 0.0, 0.5])  # bottom-right at step 1
    maps[..., 3] = 0.5 - maps[..., 2]
    info = TraceInfo(prompts=["a red circle"], rows=[Row("cond", 0, 0)], tokenizations={"cond": [tok], "uncond": []},
                     num_steps=4, all_timesteps=[900.0, 600.0, 300.0, 100.0], steps=[1, 3], layers=["up.attn2"],
                     kinds=("cross",), heads={"up.attn2": 8}, sizes={"up.attn2": (2, 2)}, image_size=(2, 2),
                     latent_size=(2, 2))
    return AttentionTrace({("cross", "up.attn2"): maps}, info)


def test_a_trace_from_its_public_constructor_answers_queries():
    tr = _hand_made_trace()
    assert tr.words() == ["a", "red", "circle"] and tr.timesteps == [600.0, 100.0]
    torch.testing.assert_close(tr.word_map("red", steps=[1]), torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(tr.word_map(1), torch.tensor([[0.25, 0.0], [0.0, 0.25]]))
    torch.testing.assert_close(tr.word_map("red", steps=-1), tr.word_map("red", steps=[3]))  # the run's last step
    with pytest.raises(sdlens.CaptureError, match=r"steps \[2\] were not captured; captured steps are \[1, 3\]"):
        tr.word_map("red", steps=-2)  # -2 is step 2 of the 4 the run made, not the second-last captured
    with pytest.raises(AttributeError, match="read-only"):
        tr.steps = [0]
    assert tr.replace(prompts=["b"]).prompts == ["b"] and tr.prompts == ["a red circle"]


def test_one_error_type_and_one_meaning_of_steps_in_the_trace_and_the_pictures(sd1_pipe):
    from sdlens import viz
    from sdlens.viz.frames import step_position

    with sdlens.trace(sd1_pipe, steps=[0, 2]) as tr:
        run(sd1_pipe, steps=4)
    for bad in (lambda: tr.word_map("dog"), lambda: viz.overlay(tr, "dog"), lambda: tr.word_map("red", steps=[1]),
                lambda: step_position(tr, 1), lambda: viz.resolve_target(tr, 9), lambda: tr.word_map("red", heads=0),
                lambda: tr.word_map("red", layers="nope")):
        with pytest.raises(sdlens.CaptureError):
            bad()
    with pytest.raises(sdlens.CaptureError, match=r"steps \[3\] were not captured"):
        step_position(tr, -1)  # -1: the run's last step (3), which was not captured: as tr.word_map says
    with pytest.raises(sdlens.CaptureError, match=r"steps \[3\] were not captured"):
        tr.word_map("red", steps=-1)
    assert step_position(tr, -2) == tr.step_positions([-2])[0] == 1
    with pytest.raises(sdlens.CaptureError, match="'last'"):
        sdlens.trace(sd1_pipe, steps="last")
    with pytest.raises(sdlens.BudgetError):
        sdlens.trace(sd1_pipe, max_bytes=0)

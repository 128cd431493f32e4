"""One vocabulary across the public API (docs/vocabulary.md, ``sdlens.vocabulary``).

- every public function's and method's keyword names come from ``sdlens.vocabulary.NAMES``, and the
  names that once meant two things now mean one (a ``steps`` is never a count, an ``image`` never an
  index); the command's options are its Python function's keywords;
- every mistake in a call of the public API raises an ``SdlensError`` subclass, in one line;
- the old names still work, with a ``DeprecationWarning`` naming the new one.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch

import sdlens
from sdlens.errors import (
    CaptureError,
    CommandError,
    EditError,
    ModelError,
    SdlensError,
    SweepError,
    TokenError,
    WorldError,
)
from sdlens.vocabulary import NAMES, RENAMED, renamed

# ------------------------------------------------------------------------------------------ the surface
# The public API whose keywords the vocabulary governs: each module's exported names. Records that
# sdlens hands back or configures with (dataclasses of results, configs and scene parts) are data,
# their fields documented on the class; they are left out, as are the hook layer's controller
# interface (sdlens.hooks: for writing controllers), the models' training (sdlens.models.train) and
# the resolution helpers the kit's parts share (sdlens.select: they take the caller's error class).
SURFACE = {
    "sdlens": ["load_pipeline", "trace", "load_trace", "AttentionTrace"],
    "sdlens.edit": ["align", "edit", "inject_self", "invert", "refine", "refine_alignment", "replace",
                    "replace_alignment", "reweight", "Blend"],
    "sdlens.sweep": ["assign", "item_record", "load", "localisation", "read_items", "run_sweep", "SweepFolder"],
    "sdlens.viz": "__all__",
    "sdlens.widgets": "__all__",
    "sdlens.world": "__all__",
    "sdlens.maps": ["upsample", "average_upsampled", "normalize"],
    "sdlens.tokens": ["tokenize", "load_clip_tokenizer", "Tokenization.word_index", "Tokenization.word_indices"],
    "sdlens.commands.attend": ["attend", "generate"],
    "sdlens.commands.edit": ["run_edit"],
    "sdlens.commands.sweep": ["sweep", "report"],
}
RECORDS = {"Frame", "Target", "Detected", "Obj", "Placement", "Rendering", "Scene"}  # dataclasses of results


def _callables():
    """``(qualified name, callable)`` of every function, method and constructor of the surface."""
    for module_name, names in SURFACE.items():
        module = importlib.import_module(module_name)
        if names == "__all__":
            names = module.__all__
        for name in names:
            owner, _, member = name.partition(".")
            obj = getattr(module, owner)
            if member:
                yield f"{module_name}.{name}", getattr(obj, member)
            elif inspect.isclass(obj):
                if name in RECORDS:
                    continue
                if not dataclasses.is_dataclass(obj) or name == "Blend":
                    yield f"{module_name}.{name}", obj
                for attr, value in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(value):
                        yield f"{module_name}.{name}.{attr}", value
            elif callable(obj) and not isinstance(obj, (str, tuple, dict)):
                yield f"{module_name}.{name}", obj


def _keywords(fn) -> dict[str, inspect.Parameter]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {n: p for n, p in params.items()
            if n not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)}


def test_the_surface_is_what_the_test_walks():
    names = dict(_callables())
    assert len(names) > 100
    for expected in ("sdlens.AttentionTrace.word_map", "sdlens.edit.replace", "sdlens.viz.overlay",
                     "sdlens.widgets.EditExplorer", "sdlens.sweep.run_sweep", "sdlens.world.render",
                     "sdlens.commands.attend.attend"):
        assert expected in names, expected


def test_every_public_keyword_is_a_name_of_the_vocabulary():
    unknown = {f"{where}({name}=)" for where, fn in _callables() for name in _keywords(fn) if name not in NAMES}
    assert not unknown, f"add these to sdlens.vocabulary.NAMES (or use a name from it): {sorted(unknown)}"


def test_the_names_that_meant_two_things_mean_one():
    """``steps`` selects step indices (default None), never counts; ``image`` and ``prompt`` are a
    picture and a text, never an index; the old meanings have their own names."""
    for where, fn in _callables():
        for name, p in _keywords(fn).items():
            default = p.default
            if name in ("steps", "layers", "heads"):
                assert default is p.empty or default is None or isinstance(default, str), (where, name, default)
            if name in ("image", "prompt"):
                assert not isinstance(default, int) or isinstance(default, bool), (where, name, default)
            if name in ("image_index", "prompt_index", "num_inference_steps", "num_processes", "batch_size"):
                assert default is p.empty or isinstance(default, int), (where, name, default)
    assert "world" not in NAMES and "guidance" not in NAMES and "cross_steps" not in NAMES


def test_command_options_are_the_python_keywords():
    """``sdlens attend|edit|sweep|report``: each option's name is a keyword of the function it calls
    (``--num-inference-steps`` is ``num_inference_steps=``); only ``--no-progress`` is ``progress=False``."""
    import argparse

    from sdlens.cli import build_parser
    from sdlens.commands.attend import attend
    from sdlens.commands.edit import run_edit
    from sdlens.commands.sweep import report, sweep

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, fn in {"attend": attend, "edit": run_edit, "sweep": sweep, "report": report}.items():
        keywords = set(_keywords(fn))
        for action in sub.choices[command]._actions:
            if action.dest in ("help", "no_progress") or action.help == argparse.SUPPRESS:
                continue
            assert action.dest in keywords, (command, action.option_strings or action.dest)
            assert all(o == "--" + action.dest.replace("_", "-") for o in action.option_strings), action.option_strings


# ------------------------------------------------------------------------------------------ the error family
@pytest.fixture(scope="module")
def tiny():
    return sdlens.load_pipeline()


@pytest.fixture(scope="module")
def traced(tiny):
    with sdlens.trace(tiny, record_latents=True) as tr:
        image = tiny("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    return tr, image


def _run(tracer, pipe):
    with tracer:
        pipe("a red circle", num_inference_steps=1)


def _mistakes(tiny, traced, tmp_path):
    """``(expected class, a call of the public API with one bad argument)``, a few in each part of the kit."""
    from sdlens import edit, maps, sweep, tokens, viz, widgets, world
    from sdlens.commands.attend import attend
    from sdlens.commands.edit import run_edit
    from sdlens.commands.sweep import sweep as sweep_command

    tr, image = traced
    tok = tokens.tokenize("a red circle and a red square")
    items = [sweep.Item("000000-s0", "a red circle", 0)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    return [
        # trace and capture
        (CaptureError, lambda: sdlens.trace(tiny, heads="some")),
        (CaptureError, lambda: sdlens.trace(tiny, steps="all")),
        (CaptureError, lambda: _run(sdlens.trace(tiny, layers="nowhere.*"), tiny)),
        (CaptureError, lambda: tr.word_map("dog")),
        (CaptureError, lambda: tr.word_map("circle", steps=[9])),
        (CaptureError, lambda: tr.word_map("circle", layers=3)),
        (CaptureError, lambda: tr.word_map("circle", heads=[0])),
        (CaptureError, lambda: tr.row(prompt_index=4)),
        (CaptureError, lambda: tr.token_map(slot="3")),
        (CaptureError, lambda: tr.maps(tr.layers[0], kind="sideways")),
        (CaptureError, lambda: sdlens.load_trace(tmp_path / "prompts.txt")),
        # edits
        (EditError, lambda: edit.replace(tiny, "a red circle", "a blue circle", cross_window=2.0)),
        (EditError, lambda: edit.replace(tiny, "a red circle", "a blue circle", self_window="half")),
        (EditError, lambda: edit.edit(tiny, "a red circle", ["a blue circle"], method="swap")),
        (EditError, lambda: edit.edit(tiny, "a red circle", ["a red circle"], method="reweight")),
        (EditError, lambda: edit.replace(tiny, "a red circle", "a blue circle", inversion="exact")),
        (EditError, lambda: edit.reweight(tiny, "a red circle", {"dog": 2.0})),
        (EditError, lambda: edit.replace(tiny, "a red circle", "a blue circle", blend="dog")),
        (EditError, lambda: edit.invert(tiny, np.zeros((64, 64, 3), np.uint8), "a", (8, 8), inversion="exact")),
        (EditError, lambda: edit.invert(tiny, np.zeros((64, 64, 3), np.uint8), "a", (8, 8), num_inference_steps=0)),
        (EditError, lambda: edit.align(tok, tok, "swap")),
        # sweeps
        (SweepError, lambda: sweep.load(tmp_path)),
        (SweepError, lambda: sweep.read_items(tmp_path / "none.txt")),
        (SweepError, lambda: sweep.assign(items, 2, num_processes=2)),
        (SweepError, lambda: sweep.assign(items, 0, num_processes=1, batch_size=0)),
        (SweepError, lambda: sweep.run_sweep(tiny, items, tmp_path / "sw", {"steps": 2, "num_inference_steps": 2})),
        # the shapes world
        (WorldError, lambda: world.parse_caption("a purple dog")),
        (WorldError, lambda: world.sample_scene(np.random.default_rng(0), n_objects=3)),
        # models
        (ModelError, lambda: sdlens.load_pipeline("tiny-xl")),
        (ModelError, lambda: sdlens.load_pipeline(scheduler="sideways")),
        (ModelError, lambda: sdlens.models.TinyConfig(image_size=63)),
        # tokens
        (TokenError, lambda: tokens.tokenize("a red circle", max_length=1)),
        (TokenError, lambda: tok.word_index("red")),
        (TokenError, lambda: tok.word_index("dog")),
        (TokenError, lambda: tok.word_index("red", occurrence=5)),
        # maps
        (CaptureError, lambda: maps.average_upsampled([], (8, 8))),
        # viz
        (CaptureError, lambda: viz.overlay(tr, "dog", image)),
        (CaptureError, lambda: viz.overlay(tr, ("slot", 99), image)),
        (CaptureError, lambda: viz.denoising(tr, step="last")),
        (CaptureError, lambda: viz.denoising(tr, step=7)),
        (CaptureError, lambda: viz.as_rgb(np.zeros((2, 2, 2, 2)))),
        (CaptureError, lambda: viz.self_attention_map(tr, (10, 10), image)),
        # widgets
        (CaptureError, lambda: widgets.AttentionExplorer(tr, image, word="dog")),
        (CaptureError, lambda: widgets.SelfAttentionExplorer(tr, image)),
        (CaptureError, lambda: widgets.DenoisingExplorer(tr.replace(x0=None, latents=None, xt_images=None,
                                                                    x0_images=None))),
        (EditError, lambda: widgets.EditExplorer(tiny, "a red circle", "a blue circle", method="swap")),
        # the commands' Python side
        (CommandError, lambda: attend("a red circle", num_inference_steps=0, pipe=tiny, out=tmp_path / "a")),
        (CommandError, lambda: attend("a red circle", words=["dog"], pipe=tiny, out=tmp_path / "a")),
        (CommandError, lambda: run_edit("a red circle", "a blue circle", method="swap", pipe=tiny)),
        (CommandError, lambda: run_edit("a red circle", "a blue circle", inversion="exact", pipe=tiny)),
        (CommandError, lambda: run_edit("a red circle", "a blue circle", num_inference_steps=0, pipe=tiny)),
        (SweepError, lambda: sweep_command(str(prompts), out=str(tmp_path / "s"), num_inference_steps=0)),
        # an old keyword and its new name together
        (SdlensError, lambda: tr.word_map("circle", prompt=0, prompt_index=0)),
    ]


def test_every_mistake_raises_one_line_of_the_error_family(tiny, traced, tmp_path):
    """Each bad call raises its part's ``SdlensError`` subclass (a ``ValueError``), in one line."""
    wrong = []
    for expected, call in _mistakes(tiny, traced, tmp_path):
        where = f"line {call.__code__.co_firstlineno}: "
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                call()
        except SdlensError as e:
            if not isinstance(e, expected) or "\n" in str(e).strip():
                wrong.append(f"{where}{type(e).__name__} (not {expected.__name__}) or several lines: {e}")
        except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
            wrong.append(f"{where}{type(e).__name__} outside the family: {e}")
        else:
            wrong.append(f"{where}no error from a bad call expecting {expected.__name__}")
    assert not wrong, "\n".join(wrong)


def test_bad_choices_name_the_valid_ones(traced):
    tr, _ = traced
    with pytest.raises(CaptureError, match=r"its words are \['a', 'red', 'circle', 'on', 'the', 'left'\]"):
        tr.word_map("dog")
    with pytest.raises(EditError, match=r"choose one of: 'replace', 'refine', 'reweight', 'inject_self', 'mutual'"):
        sdlens.edit.edit(None, "a", ["b"], method="swap")
    with pytest.raises(CaptureError, match=r"this run has steps 0\.\.1"):
        tr.word_map("circle", steps=[6])


# ------------------------------------------------------------------------------------------ old names
def test_old_keywords_still_work_and_warn_with_the_new_name(traced):
    tr, image = traced
    pairs = [
        (lambda: tr.word_map("circle", prompt=0, image=0), lambda: tr.word_map("circle", prompt_index=0, image_index=0),
         "prompt_index"),
        (lambda: tr.token_map(index=3), lambda: tr.token_map(slot=3), "slot"),
        (lambda: tr.row(prompt=0, image=0), lambda: tr.row(prompt_index=0, image_index=0), "image_index"),
        (lambda: tr.words(prompt=0), lambda: tr.words(prompt_index=0), "prompt_index"),
        (lambda: sdlens.viz.target_map(tr, "circle", prompt=0), lambda: sdlens.viz.target_map(tr, "circle", prompt_index=0),
         "prompt_index"),
        (lambda: sdlens.viz.denoising_frame(tr, -1, image=0).x0, lambda: sdlens.viz.denoising_frame(tr, -1, image_index=0).x0,
         "image_index"),
        (lambda: sdlens.sweep.assign(list(range(5)), 1, world=2, batch=2),
         lambda: sdlens.sweep.assign(list(range(5)), 1, num_processes=2, batch_size=2), "num_processes"),
    ]
    for old, new, name in pairs:
        with pytest.warns(DeprecationWarning, match=rf"now {name}=") as caught:
            before = old()
        assert caught[0].filename == __file__  # the warning points at the caller's line
        after = new()
        if torch.is_tensor(after):
            torch.testing.assert_close(before, after)
        elif isinstance(after, np.ndarray):
            assert np.array_equal(before, after)
        else:
            assert before == after


def test_old_edit_keywords_run_the_same_edit(tiny):
    kw = dict(seed=3, num_inference_steps=2, output_type="np")
    with pytest.warns(DeprecationWarning, match="cross_steps= is now cross_window="):
        old = sdlens.edit.replace(tiny, "a red circle", "a blue circle", cross_steps=0.5, self_steps=0.0, **kw)
    new = sdlens.edit.replace(tiny, "a red circle", "a blue circle", cross_window=0.5, self_window=0.0, **kw)
    assert np.array_equal(old.images[1], new.images[1]) and new.settings["cross_window"] == 0.5
    with pytest.warns(DeprecationWarning, match="kind= is now method="):
        by_kind = sdlens.edit.edit(tiny, "a red circle", ["a blue circle"], kind="replace", cross_window=0.5, **kw)
    assert np.array_equal(by_kind.images[1], new.images[1]) and by_kind.settings["method"] == "replace"


def test_every_rename_is_registered_with_a_new_name_of_the_vocabulary():
    list(_callables())  # imports every module of the surface, so that their renames are registered
    assert len(RENAMED) >= 40
    for where, pairs in RENAMED.items():
        for old, new in pairs.items():
            assert new in NAMES, (where, new)
            assert old != new


def test_renamed_refuses_both_names_and_keeps_the_signature():
    @renamed(world="num_processes")
    def share(items, *, num_processes: int = 1):
        return num_processes

    assert list(inspect.signature(share).parameters) == ["items", "num_processes"]
    with pytest.raises(SdlensError, match="world= and num_processes="):
        share([], world=2, num_processes=2)
    with pytest.raises(TypeError, match="does not fit"):
        renamed(size="width")(share)


def test_old_command_options_still_work_hidden_and_noted(capsys):
    import argparse
    import re

    from sdlens.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["attend", "a red circle", "--steps", "3", "--guidance", "1", "--negative", "blue"])
    assert (args.num_inference_steps, args.guidance_scale, args.negative_prompt) == (3, 1.0, "blue")
    err = capsys.readouterr().err
    assert "--steps is now --num-inference-steps" in err and "--negative is now --negative-prompt" in err
    args = parser.parse_args(["edit", "a", "b", "--cross-steps", "0.5", "--self-steps", "0.2", "--word-steps", "b=0.3"])
    assert (args.cross_window, args.self_window, args.word_windows) == ("0.5", "0.2", ["b=0.3"])
    assert parser.parse_args(["sweep", "p.txt", "--out", "o", "--batch", "2"]).batch_size == 2
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c: sub.choices[c].format_help() for c in ("attend", "edit", "sweep")}
    for command, new, old in [("attend", "--num-inference-steps", "--steps"), ("attend", "--guidance-scale", "--guidance"),
                              ("edit", "--cross-window", "--cross-steps"), ("sweep", "--batch-size", "--batch")]:
        assert new in helps[command] and not re.search(rf"{old}\b(?!-)", helps[command]), (command, old)

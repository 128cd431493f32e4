"""The explorers, driven headlessly: set a control, and the picture shown is what the viz figure draws.

Each explorer shows a PNG in an ``ipywidgets.Image``; ``displayed()`` decodes it (at the size of the
picture, the PNG being an exact integer enlargement). The figures' drawn arrays come from
``ax.images[0].get_array()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdlens
import sdlens.viz as viz
from sdlens.errors import CaptureError
from sdlens.widgets import AttentionExplorer, DenoisingExplorer, SelfAttentionExplorer
from sdlens.widgets.base import decode_png

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is as fast, and immune to a CPU shared with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sd1_pipe):
    """A trace saved to disk and loaded back: the explorers get no pipeline at all, so cannot re-run one."""
    pipe = sd1_pipe
    with sdlens.trace(pipe, self_attn=True, heads="all", record_latents=True) as tr:
        image = pipe(PROMPT, num_inference_steps=3, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    path = tr.save(tmp_path_factory.mktemp("trace") / "run.safetensors")
    return sdlens.load_trace(path), image


def drawn(fig, i: int = 0) -> np.ndarray:
    return np.asarray([ax for ax in fig.axes if ax.images][i].images[0].get_array())


def shows(explorer, expected: np.ndarray) -> None:
    """The explorer shows exactly ``expected`` (and ``render()`` returns it)."""
    assert np.array_equal(explorer.render(), expected)
    assert np.array_equal(explorer.displayed(), expected)
    png = decode_png(explorer.image.value)
    assert png.shape[0] >= 256 and png.shape[0] % expected.shape[0] == 0  # an exact enlargement


def test_attention_explorer_shows_what_overlay_draws(saved):
    tr, image = saved
    ex = AttentionExplorer(tr, image)
    c = ex.controls
    assert {"word", "step", "play", "all_steps", "layers", "head", "alpha"} <= set(c)
    assert c["word"].value == 0 and c["all_steps"].value is True and c["step"].options[-1] == ("2", 2)
    shows(ex, drawn(viz.overlay(tr, "a", image)))

    redraws = ex.redraws
    before = ex.displayed()
    c["word"].value = 2  # "circle"
    assert ex.redraws == redraws + 1  # one change, one redraw
    assert not np.array_equal(ex.displayed(), before)
    shows(ex, drawn(viz.overlay(tr, "circle", image)))

    c["step"].value = 1  # looking at one step unticks "average over all steps"
    assert c["all_steps"].value is False and ex.redraws == redraws + 2
    shows(ex, drawn(viz.overlay(tr, "circle", image, steps=[1])))

    c["layers"].value = "size:16"
    shows(ex, drawn(viz.overlay(tr, "circle", image, steps=[1], layers=16)))
    layer = tr.layers_of("cross")[-1]
    c["layers"].value = layer
    shows(ex, drawn(viz.overlay(tr, "circle", image, steps=[1], layers=layer)))

    c["head"].value = 1
    shows(ex, drawn(viz.overlay(tr, "circle", image, steps=[1], layers=layer, heads=1)))
    c["alpha"].value = 0.3
    shows(ex, drawn(viz.overlay(tr, "circle", image, steps=[1], layers=layer, heads=1, alpha=0.3)))

    c["word"].value = "<start>"
    shows(ex, drawn(viz.overlay(tr, "<start>", image, steps=[1], layers=layer, heads=1, alpha=0.3)))
    assert "<b>&lt;start&gt;</b>" in ex.info.value and "of the attention" in ex.info.value
    c["word"].value = ("slot", 5)
    shows(ex, drawn(viz.overlay(tr, ("slot", 5), image, steps=[1], layers=layer, heads=1, alpha=0.3)))

    c["all_steps"].value = True
    shows(ex, drawn(viz.overlay(tr, ("slot", 5), image, layers=layer, heads=1, alpha=0.3)))
    # settings() are the overlay's keyword arguments
    s = ex.settings()
    shows(ex, drawn(viz.overlay(tr, s.pop("word"), image, **s)))


def test_attention_explorer_options(saved):
    tr, image = saved
    ex = AttentionExplorer(tr, image, word="circle")
    labels = [label for label, _ in ex.controls["word"].options]
    assert labels[:6] == tr.words() and labels[6:9] == ["<start>", "<end>", "<pad>"]
    assert labels[9:] == [f"#{i} {t}" for i, t in enumerate(tr.tokens()[:8])]
    assert ex.controls["word"].value == 2
    layer_labels = [label for label, _ in ex.controls["layers"].options]
    assert layer_labels[:3] == ["all layers", "32×32 maps (3 layers)", "16×16 maps (4 layers)"]
    assert [label for label, _ in ex.controls["head"].options] == ["mean of heads", "head 0", "head 1"]
    with ex.hold():  # several changes, one redraw
        n = ex.redraws
        ex.controls["word"].value = 1
        ex.controls["alpha"].value = 0.9
    assert ex.redraws == n + 1
    # heads averaged at capture: no head choice
    avg = tr.replace(maps={(kind, layer): tr.maps(layer, kind).flatten(3, 4).mean(2, keepdim=True)
                           for kind, layer in tr.keys()}, head_indices=None)
    ex = AttentionExplorer(avg)  # no image: the map alone
    assert ex.controls["head"].disabled
    shows(ex, drawn(viz.overlay(avg, "a")))


def test_attention_explorer_repeated_words(sd1_pipe):
    """A word the prompt holds twice is offered, and accepted, as "red (1)" / "red (2)"."""
    pipe = sd1_pipe
    with sdlens.trace(pipe) as tr:
        pipe("a red circle and a red square", num_inference_steps=2, height=64, width=64,
             generator=torch.Generator().manual_seed(0))
    ex = AttentionExplorer(tr, word="red (2)")
    labels = [label for label, _ in ex.controls["word"].options]
    assert labels[:7] == ["a (1)", "red (1)", "circle", "and", "a (2)", "red (2)", "square"]
    assert ex.controls["word"].value == 5
    shows(ex, drawn(viz.overlay(tr, "red (2)")))
    assert np.array_equal(viz.overlay(tr, "red (2)").axes[0].images[0].get_array(),
                          viz.overlay(tr, 5).axes[0].images[0].get_array())
    assert AttentionExplorer(tr, word=1).controls["word"].value == 1
    assert AttentionExplorer(tr, word="<pad>").controls["word"].value == "<pad>"
    with pytest.raises(CaptureError, match="'red \\(1\\)' \\(word 1"):
        AttentionExplorer(tr, word="red")
    with pytest.raises(CaptureError, match="not a word"):
        AttentionExplorer(tr, word="triangle")
    with pytest.raises(CaptureError, match="not one of the explorer's choices"):
        AttentionExplorer(tr, word=99)


def test_self_attention_explorer_shows_what_self_attention_map_draws(saved):
    tr, image = saved
    ex = SelfAttentionExplorer(tr, image)
    c = ex.controls
    assert (c["y"].value, c["x"].value) == (32, 32) and c["y"].max == 63
    shows(ex, drawn(viz.self_attention_map(tr, (32, 32), image)))
    c["y"].value = 5
    c["x"].value = 60
    shows(ex, drawn(viz.self_attention_map(tr, (5, 60), image)))
    c["step"].value = 0
    c["layers"].value = "size:32"
    shows(ex, drawn(viz.self_attention_map(tr, (5, 60), image, steps=[0], layers=32)))
    c["head"].value = 0
    shows(ex, drawn(viz.self_attention_map(tr, (5, 60), image, steps=[0], layers=32, heads=0)))
    # a click (ipyevents' event) moves the query pixel: relative to the drawn size
    n = ex.redraws
    ex.on_click({"relativeX": 80.0, "relativeY": 240.0, "boundingRectWidth": 320.0, "boundingRectHeight": 320.0})
    assert (c["y"].value, c["x"].value) == (48, 16) and ex.redraws == n + 1
    shows(ex, drawn(viz.self_attention_map(tr, (48, 16), image, steps=[0], layers=32, heads=0)))
    cross_only = tr.replace(kinds=("cross",))
    with pytest.raises(CaptureError, match="self_attn=True"):
        SelfAttentionExplorer(cross_only, image)


def test_denoising_explorer_shows_what_denoising_draws(saved):
    tr, _ = saved
    ex = DenoisingExplorer(tr)
    assert ex.controls["step"].value == 0
    for step in (0, 2, 1):
        ex.controls["step"].value = step
        fig = viz.denoising(tr, step)
        xt, x0 = drawn(fig, 0), drawn(fig, 1)
        shows(ex, np.concatenate([xt, np.full((64, DenoisingExplorer.GAP, 3), 255, np.uint8), x0], axis=1))
        assert np.array_equal(xt, tr.xt_images[step, 0]) and np.array_equal(x0, tr.x0_images[step, 0])
        assert f"noise {tr.noise_levels[step]:.2f}" in ex.info.value
        assert ex.noise_bar.value == pytest.approx(tr.noise_levels[step])
    bare = tr.replace(xt_images=None, x0_images=None)
    with pytest.raises(CaptureError, match="record_latents=True"):
        DenoisingExplorer(bare)


def test_explorers_display_as_widgets(saved):
    tr, image = saved
    for ex in (AttentionExplorer(tr, image), SelfAttentionExplorer(tr, image), DenoisingExplorer(tr)):
        view = ex._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
        assert view["model_id"] == ex.ui.model_id  # what Jupyter shows is the explorer's widget tree
        again = ex._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
        assert again["model_id"] == view["model_id"]  # built once: shown again, the same tree
        shown = list(_descendants(ex.ui))
        assert all(any(c is w for w in shown) for c in ex.controls.values())  # every control is in it


def _descendants(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)

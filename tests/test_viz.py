"""sdlens.viz figures and the `sdlens attend` command, on traces of tiny random-weight pipelines.

Random weights make random maps, so the tests that check *where* a figure draws heat use traces
whose stored maps were replaced by hand (a map hot only in the top-left quarter, a start slot
that takes 90% of the attention, self-attention with two regions).
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sdlens
import sdlens.viz as viz
from sdlens.cli import main as cli_main
from sdlens.errors import CaptureError
from sdlens.viz._figure import new_figure
from sdlens.viz.frames import heat_frame, overlay_frame, self_frame, target_map

PROMPT = "a red circle on the left"
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is as fast, and immune to a CPU shared with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(sd1_pipe):
    return sd1_pipe


@pytest.fixture(scope="module")
def run(pipe):
    """A 64x64, 3-step trace with cross- and self-attention, every head, and the denoising previews."""
    with sdlens.trace(pipe, self_attn=True, heads="all", record_latents=True, dtype=torch.float32) as tr:
        out = pipe(PROMPT, num_inference_steps=STEPS, height=64, width=64, generator=torch.Generator().manual_seed(0))
    return tr, out.images[0]


GREY = np.full((64, 64, 3), 128, np.uint8)


def drawn(ax) -> np.ndarray:
    """The array an axes' (first) image shows."""
    return np.asarray(ax.images[0].get_array())


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def hot_top_left(tr, word="circle"):
    """A copy of ``tr`` whose cross maps of ``word`` are 0.5 in the top-left quarter and 0 elsewhere."""
    slot = tr.tokenization().word_tokens[tr.words().index(word)][0]
    new = {}
    for layer in tr.layers_of("cross"):
        d = tr.maps(layer).flatten(3, 4)  # (steps, rows, heads, n, keys)
        h, w = tr.map_size(layer)
        quarter = torch.zeros(h, w, dtype=torch.bool)
        quarter[: h // 2, : w // 2] = True
        m = torch.zeros(h * w, d.shape[-1])
        m[:, 0] = 1.0  # everything to the start slot...
        m[quarter.flatten(), 0] = 0.5
        m[quarter.flatten(), slot] = 0.5  # ...but half of the top-left quarter's attention goes to the word
        new[("cross", layer)] = m.expand_as(d).clone().to(d.dtype)
    return tr.replace(maps=new)


def start_takes(tr, share=0.9):
    """A copy of ``tr`` where every pixel gives ``share`` of its attention to the start slot, the rest evenly."""
    new = {}
    for layer in tr.layers_of("cross"):
        d = tr.maps(layer).flatten(3, 4)
        k = d.shape[-1]
        m = torch.full((k,), (1 - share) / (k - 1))
        m[0] = share
        new[("cross", layer)] = m.expand_as(d).clone().to(d.dtype)
    return tr.replace(maps=new)


def hot_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels drawn in the hot end of 'jet' (red over blue) on the grey image."""
    rgb = rgb.astype(int)
    return rgb[..., 0] > rgb[..., 2] + 40


# ---------------------------------------------------------------------------------------- frames
def test_targets_words_specials_and_slots(run):
    tr, _ = run
    t = viz.resolve_target(tr, "circle")
    assert (t.label, t.kind, t.slots) == ("circle", "word", (3,))
    assert viz.resolve_target(tr, 2) == t
    assert viz.resolve_target(tr, "<start>").slots == (0,)
    assert viz.resolve_target(tr, "<end>").slots == (7,)
    pad = viz.resolve_target(tr, "<pad>")
    assert pad.slots == tuple(range(8, 77)) and pad.label == "<pad> ×69" and pad.reduce == "sum"
    assert viz.resolve_target(tr, ("slot", 3)).label == "#3 circle"
    with pytest.raises(CaptureError, match="square.*words are"):
        viz.resolve_target(tr, "square")
    with pytest.raises(CaptureError, match="out of range"):
        viz.resolve_target(tr, 6)
    # a word's map is the trace's own word_map; the padding's is the sum of its slots' maps
    torch.testing.assert_close(viz.target_map(tr, "circle"), tr.word_map("circle"))
    torch.testing.assert_close(viz.target_map(tr, "<pad>"), tr.slot_map(list(range(8, 77))) * 69)


def test_as_rgb_takes_pil_numpy_and_torch():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(viz.as_rgb(Image.fromarray(a)), a)
    assert np.array_equal(viz.as_rgb(torch.from_numpy(a).permute(2, 0, 1)), a)
    assert np.array_equal(viz.as_rgb(a.astype(np.float32) / 255), a)
    assert viz.as_rgb(np.zeros((5, 7))).shape == (5, 7, 3)
    with pytest.raises(CaptureError, match="an image must be"):
        viz.as_rgb(np.zeros((2, 5, 7, 3)))


def test_attention_shares_sum_to_one_over_all_slots(run):
    tr, _ = run
    targets = viz.frames.prompt_targets(tr)
    assert len(targets) == 6 + 3
    shares = viz.attention_shares(tr, targets)
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert viz.attention_shares(start_takes(tr), ["<start>"])[0] == pytest.approx(0.9, abs=1e-3)


# ---------------------------------------------------------------------------------------- overlay
def test_overlay_draws_the_frame_with_title_and_colorbar(run):
    tr, image = run
    fig = viz.overlay(tr, "circle", image)
    ax = image_axes(fig)[0]
    assert ax.get_title() == "circle"
    frame = overlay_frame(tr, "circle", image)
    assert drawn(ax).shape == (64, 64, 3) and np.array_equal(drawn(ax), frame.rgb)
    bar = [a for a in fig.axes if a is not ax]
    assert len(bar) == 1 and bar[0].get_ylim() == pytest.approx((frame.vmin, frame.vmax))
    # the colour range is the map's own min..max, in attention probabilities
    heat = tr.word_map("circle").numpy()
    assert (frame.vmin, frame.vmax) == pytest.approx((heat.min(), heat.max()))
    # into a given axes; a title; no colour bar
    fig2 = new_figure()
    ax2 = fig2.add_subplot()
    assert viz.overlay(tr, "red", image, ax=ax2, title="RED", colorbar=False) is fig2
    assert ax2.get_title() == "RED" and len(fig2.axes) == 1


def test_overlay_is_aligned_with_the_image(run):
    tr, _ = run
    hot = hot_top_left(tr)
    fig = viz.overlay(hot, "circle", GREY)
    rgb = drawn(image_axes(fig)[0])
    mask = hot_mask(rgb)
    band = 6  # bilinear upsampling of 16x16 and 32x32 grids blurs a few pixels around the quarter's edge
    assert mask[: 32 - band, : 32 - band].all()
    assert not mask[32 + band :, :].any() and not mask[:, 32 + band :].any()
    # ...and the figure as rendered (imshow's orientation and extent included): hot only top left
    fig.canvas.draw()
    canvas = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    bb = image_axes(fig)[0].get_window_extent()
    H = canvas.shape[0]
    x0, x1, y0, y1 = int(bb.x0) + 2, int(bb.x1) - 2, int(H - bb.y1) + 2, int(H - bb.y0) - 2
    shown = hot_mask(canvas[y0:y1, x0:x1])
    h, w = shown.shape
    m = int(band / 64 * h) + 2
    assert shown[: h // 2 - m, : w // 2 - m].mean() > 0.98
    assert shown[h // 2 + m :, :].mean() < 0.01 and shown[:, w // 2 + m :].mean() < 0.01


# ---------------------------------------------------------------------------------------- grids
def test_word_grid_panels_titles_and_shares(run):
    tr, image = run
    fig = viz.word_grid(tr, image, scale="each")
    axes = image_axes(fig)
    assert len(axes) == 1 + 6 + 3
    assert axes[0].get_title() == PROMPT and np.array_equal(drawn(axes[0]), viz.as_rgb(image))
    titles = [ax.get_title().split("\n") for ax in axes[1:]]
    assert [t[0] for t in titles] == tr.words() + ["<start>", "<end>", "<pad> ×69"]
    assert all(t[1].endswith("of attention") for t in titles)
    for ax, word in zip(axes[1:], tr.words()):
        assert np.array_equal(drawn(ax), overlay_frame(tr, word, image).rgb)
    assert len(image_axes(viz.word_grid(tr, image, specials=False))) == 1 + 6
    assert len(image_axes(viz.word_grid(tr, words=["circle", "left"], specials=False))) == 2  # no image


def test_overlays_follow_the_convention_grey_picture_and_one_scale_for_compared_panels(run):
    """An object's own colour cannot pass for attention (the map is laid over the picture's grey),
    and panels that are compared share one colour scale unless asked otherwise."""
    tr, image = run
    rgb = viz.as_rgb(image).copy()
    red = rgb.copy()
    red[20:40, 20:40] = (255, 0, 0)  # a saturated red square ...
    lum = int(round(0.2126 * 255))
    grey = rgb.copy()
    grey[20:40, 20:40] = (lum, lum, lum)  # ... and a grey one of the same luminance
    for f in (lambda im: overlay_frame(tr, "circle", im).rgb, lambda im: drawn(image_axes(viz.overlay(tr, "circle", im))[0])):
        a, b = f(red), f(grey)
        assert np.array_equal(a, b)  # the picture's hue never reaches the panel
    fig = viz.word_grid(tr, image, specials=False)
    panels = [drawn(ax) for ax in image_axes(fig)[1:]]
    heats = [overlay_frame(tr, w, image).heat for w in tr.words()]
    lo, hi = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
    for panel, word, heat in zip(panels, tr.words(), heats):
        assert np.array_equal(panel, heat_frame(heat, image, word, vrange=(lo, hi)).rgb)  # one min..max for all
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1  # one scale, one bar
    for name in ("word_grid", "layer_grid", "head_grid"):
        assert inspect.signature(getattr(viz, name)).parameters["scale"].default == "shared", name
    from sdlens.widgets import AttentionExplorer

    a, b = (AttentionExplorer(tr, im, word="circle").frame().rgb for im in (red, grey))
    assert np.array_equal(a, b)  # the explorer draws the same way


def test_word_grid_makes_a_dominant_start_slot_visible(run):
    tr, image = run
    st = start_takes(tr, 0.9)
    fig = viz.word_grid(st, GREY, scale="absolute")
    axes = image_axes(fig)
    titles = {ax.get_title().split("\n")[0]: ax for ax in axes[1:]}
    assert titles["<start>"].get_title().split("\n")[1] == "90% of attention"
    assert titles["circle"].get_title().split("\n")[1] == "0.1% of attention"
    # one colour scale (0..the start slot's value): the start panel is hot, the words cold
    assert hot_mask(drawn(titles["<start>"])).all()
    assert not hot_mask(drawn(titles["circle"])).any()
    colorbars = [a for a in fig.axes if not a.images]
    assert len(colorbars) == 1 and colorbars[0].get_ylim()[1] == pytest.approx(0.9, abs=1e-3)


def test_layer_grid_by_layer_and_by_size(run):
    tr, image = run
    fig = viz.layer_grid(tr, "circle", image, scale="each")  # each panel as viz.overlay draws it alone
    axes = image_axes(fig)
    names = tr.layers_of("cross")
    assert len(axes) == len(names)
    assert axes[0].get_title() == "down0.0 · 32×32"
    for ax, name in zip(axes, names):
        assert np.array_equal(drawn(ax), overlay_frame(tr, "circle", image, layers=name).rgb)
    fig = viz.layer_grid(tr, "circle", image, by="size", scale="each")
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["32×32 maps (3 layers)", "16×16 maps (4 layers)"]
    assert np.array_equal(drawn(axes[1]), overlay_frame(tr, "circle", image, layers=16).rgb)
    with pytest.raises(CaptureError, match="by="):
        viz.layer_grid(tr, "circle", by="head")


def test_head_grid(run, pipe):
    tr, image = run
    layer = tr.layers_of("cross")[0]
    fig = viz.head_grid(tr, "circle", layer, image, scale="each")
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["mean of heads", "head 0", "head 1"]
    assert np.array_equal(drawn(axes[2]), overlay_frame(tr, "circle", image, layers=layer, heads=1).rgb)
    assert len(image_axes(viz.head_grid(tr, "circle", 16, image))) == 3  # the heads kept in all 16x16 layers
    with sdlens.trace(pipe) as averaged:
        pipe(PROMPT, num_inference_steps=1, height=64, width=64)
    with pytest.raises(CaptureError, match="heads='all'"):
        viz.head_grid(averaged, "circle", layer)


# ---------------------------------------------------------------------------------------- steps
def test_step_strip_maps_and_previews(run):
    tr, image = run
    fig = viz.step_strip(tr, "circle", image)
    axes = image_axes(fig)
    assert len(axes) == 2 * STEPS  # maps, then the predicted x0 at the same steps
    for j, s in enumerate(tr.steps):
        assert axes[j].get_title().startswith(f"step {s}\nt={tr.timesteps[j]:.0f}")
        assert np.array_equal(drawn(axes[STEPS + j]), tr.x0_images[j, 0])
    # one colour scale over the steps (scale="shared"): each panel is its step's map in that range
    heats = [target_map(tr, "circle", steps=[s], size=(64, 64)) for s in tr.steps]
    lo, hi = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
    for j in range(STEPS):
        assert np.array_equal(drawn(axes[j]), heat_frame(heats[j], image, "circle", vrange=(lo, hi)).rgb)
    assert len(image_axes(viz.step_strip(tr, "circle", steps=[0, 2], previews=False))) == 2
    assert viz.steps.pick_steps(tr, max_steps=2) == [0, 2]


def test_denoising_figure(run):
    tr, _ = run
    fig = viz.denoising(tr, 1)
    axes = fig.axes
    assert np.array_equal(drawn(axes[0]), tr.xt_images[1, 0]) and np.array_equal(drawn(axes[1]), tr.x0_images[1, 0])
    assert axes[2].get_title() == f"step 1 · t={tr.timesteps[1]:.0f} · noise {tr.noise_levels[1]:.2f}"
    bare = tr.replace(xt_images=None, x0_images=None)
    with pytest.raises(CaptureError, match="record_latents=True"):
        viz.denoising(bare, 1)


# ---------------------------------------------------------------------------------------- self-attention
def two_regions(tr):
    """A copy of ``tr`` whose self-attention: left-half pixels attend to the left half, right to the right."""
    g = torch.Generator().manual_seed(0)
    new = {}
    for layer in tr.layers_of("self"):
        d = tr.maps(layer, "self").flatten(3, 4)
        h, w = tr.map_size(layer)
        left = torch.zeros(h, w, dtype=torch.bool)
        left[:, : w // 2] = True
        left = left.flatten()
        m = torch.where(left[:, None] == left[None, :], 1.0, 0.0) + 0.05 * torch.rand(h * w, h * w, generator=g)
        m = m / m.sum(-1, keepdim=True)
        new[("self", layer)] = m.expand_as(d).clone().to(d.dtype)
    return tr.replace(maps=new)


def test_self_attention_map(run):
    tr, image = run
    fig = viz.self_attention_map(tr, (10, 50), image)
    ax = image_axes(fig)[0]
    assert ax.get_title().startswith("self-attention of pixel (y=10, x=50)")
    assert np.array_equal(drawn(ax), self_frame(tr, (10, 50), image).rgb)
    # the attended region is drawn where it is: a left-half pixel attends to the left half only
    two = two_regions(tr)
    rgb = drawn(image_axes(viz.self_attention_map(two, (40, 8), GREY, marker=False))[0])
    assert hot_mask(rgb)[:, :26].all() and not hot_mask(rgb)[:, 38:].any()
    marked = self_frame(two, (40, 8), GREY).rgb
    assert (marked[40, 4:13] == 255).all() and (marked[36:45, 8] == 255).all()  # a cross marks the pixel


def test_self_attention_segments_find_the_two_regions(run):
    tr, image = run
    two = two_regions(tr)
    pca, labels = viz.segment(two, 2)
    assert labels.shape == (32, 32) and pca.shape == (32, 32, 3)
    assert (labels[:, :16] == 0).all() and (labels[:, 16:] == 1).all()
    assert (pca[:, :16, 0] - pca[:, 16:, 0]).abs().min() > 0.5  # the first component separates the halves
    fig = viz.self_attention_segments(two, image, n_clusters=2)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["image", "self-attention: 3 principal components", "k-means, 2 clusters"]
    assert all(drawn(ax).shape == (64, 64, 3) for ax in axes)
    with pytest.raises(CaptureError, match="one size"):
        viz.self_attention_rows(tr, layers=[32, 16])


def test_kmeans_and_pca_are_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(30, 5, generator=g) + 8, torch.randn(30, 5, generator=g) - 8])
    labels = viz.kmeans(x, 2, seed=3)
    assert labels.tolist() == [0] * 30 + [1] * 30
    assert torch.equal(viz.pca_rgb(x, (6, 10)), viz.pca_rgb(x, (6, 10)))
    with pytest.raises(CaptureError, match="n_clusters"):
        viz.kmeans(x, 0)


# ---------------------------------------------------------------------------------------- animation
def test_animate_writes_a_gif_atomically(run, tmp_path, monkeypatch):
    tr, image = run
    path = viz.animate(tr, ["circle", "left"], tmp_path / "a" / "steps.gif", image, side=64)
    assert path == tmp_path / "a" / "steps.gif" and os.listdir(tmp_path / "a") == ["steps.gif"]
    gif = Image.open(path)
    assert gif.n_frames == STEPS
    assert gif.size[0] == 3 * 64 + 4 * 6  # predicted x0, circle, left
    frames = viz.animation_frames(tr, "circle", image, preview=None, side=64)
    assert len(frames) == STEPS and frames[0].size[0] == 64 + 2 * 6

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        viz.animate(tr, "circle", tmp_path / "b.gif", image)
    assert not any(p.name.endswith(".gif") for p in tmp_path.iterdir())  # no half-written or temp file


# ---------------------------------------------------------------------------------------- sdlens attend
@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(d)
    return d


def test_attend_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["attend", PROMPT, "--model", str(model_dir), "--num-inference-steps", "3", "--size", "64",
                   "--out", str(out), "--no-progress", "--seed", "1"])
    assert rc == 0
    words = ["a", "red", "circle", "on", "the", "left"]
    expected = ["image.png", "words.png"] + [f"word-{i:02d}-{w}.png" for i, w in enumerate(words)]
    expected += ["steps.gif", "trace.safetensors"]
    assert sorted(os.listdir(out)) == sorted(expected)
    assert capsys.readouterr().out.split() == [str(out / n) for n in expected]  # it says what it wrote
    assert Image.open(out / "image.png").size == (64, 64)
    assert Image.open(out / "steps.gif").n_frames == 3
    tr = sdlens.load_trace(out / "trace.safetensors")
    assert tr.words() == words and len(tr.steps) == 3 and tr.image_size == (64, 64)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sdlens")]  # no temp folder left
    # --words: only those words; again into the same folder (files replaced, others kept)
    rc = cli_main(["attend", PROMPT, "--model", str(model_dir), "--num-inference-steps", "2", "--size", "32x64",
                   "--words", "circle,left", "--out", str(out), "--no-progress", "--guidance-scale", "1"])
    assert rc == 0
    assert Image.open(out / "image.png").size == (64, 32)  # PIL: (width, height)
    assert Image.open(out / "steps.gif").n_frames == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--words", "square"], "--words: 'square' is not a word of this prompt; its words are ['a', 'red', 'circle', "
                                "'on', 'the', 'left']"),
        (["--size", "60"], "--size 60x60 does not fit this model: height and width must be positive multiples of 8"),
        (["--size", "big"], "--size 'big' is not a size"),
        (["--num-inference-steps", "0"], "--num-inference-steps=0: a step count must be an int of at least 1"),
        (["--model", "./no/such/model"], "no model folder './no/such/model'"),
        (["--model", "{tmp}"], "is not a diffusers pipeline folder"),
    ],
)
def test_attend_bad_arguments_give_one_line_and_write_nothing(model_dir, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    out = tmp_path / "out"
    rc = cli_main(["attend", PROMPT, "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("sdlens attend: error: ")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".sdlens")]


def test_style_text_is_dark_on_light_cells_and_light_on_dark_ones():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdlens.viz import HEAT_CMAP, annotate_cells, outline, text_color

    assert text_color(1.0, 0.0, 1.0) == "black"  # the bright end of the heat map
    assert text_color(0.0, 0.0, 1.0) == "white"  # the dark end
    assert text_color(0.2, 0.0, 1.0, cmap="gray") == "white" and text_color(0.9, 0.0, 1.0, cmap="gray") == "black"
    fig, ax = plt.subplots()
    values = np.array([[0.0, 1.0], [np.nan, 0.25]])
    ax.imshow(values, cmap=HEAT_CMAP, vmin=0, vmax=1)
    annotate_cells(ax, values, vmin=0, vmax=1)
    assert [(t.get_text(), t.get_color()) for t in ax.texts] == [("0.00", "white"), ("1.00", "black"), ("0.25", "white")]
    n = len(ax.collections)
    outline(ax, np.zeros((4, 4), bool))  # nothing to outline: nothing drawn
    assert len(ax.collections) == n
    outline(ax, np.eye(4, dtype=bool))
    assert len(ax.collections) == n + 1
    plt.close(fig)


def test_overlap_colours_each_pixel_by_region_and_mask_and_names_them():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdlens.viz import overlap
    from sdlens.viz.style import OVERLAP_COLOURS

    region = np.array([[True, True], [False, False]])
    mask = np.array([[True, False], [True, False]])
    fig, ax = plt.subplots()
    overlap(ax, region, mask, region_label="map", mask_label="object")
    shown = ax.images[0].get_array()
    want = {(0, 0): 3, (0, 1): 1, (1, 0): 2, (1, 1): 0}  # both, region only, mask only, neither
    for (r, c), k in want.items():
        assert np.allclose(shown[r, c], OVERLAP_COLOURS[k]), (r, c)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["neither", "map only", "object only", "both"]
    with pytest.raises(CaptureError, match="one shape"):
        overlap(ax, region, mask[:1])
    plt.close(fig)


def test_word_over_steps_starts_at_zero_and_head_grid_names_heads_across_layers():
    import matplotlib

    matplotlib.use("Agg")
    pipe = sdlens.load_pipeline()
    with sdlens.trace(pipe, heads="all") as tr:
        pipe("a red circle on the left", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    fig = viz.word_over_steps(tr, "circle")
    assert fig.axes[0].get_ylim()[0] == 0
    one = tr.layers_of("cross")[0]
    titles = [ax.get_title() for ax in viz.head_grid(tr, "circle", one).axes if ax.get_title()]
    assert "head 0" in titles and not any("mean over" in t for t in titles)
    size = tr.map_size(one)[0]
    n = sum(tr.map_size(name)[0] == size for name in tr.layers_of("cross"))
    titles = [ax.get_title() for ax in viz.head_grid(tr, "circle", size).axes if ax.get_title()]
    assert f"head 0 (mean over {n} layers)" in titles


def test_architecture_is_drawn_from_the_models_own_modules():
    """The plan's transformer blocks, map sizes and heads are the attention layers the hooks find."""
    from sdlens.hooks import attention_layers
    from sdlens.models.families import sd3, sd15_layout

    for pipe, size in ((sd15_layout(width=32), 512), (sdlens.load_pipeline("tiny"), None)):
        p = viz.plan(pipe, size, size)
        layers = [i for i in attention_layers(pipe.unet) if i.role == "cross"]
        latent = p.latent[1:]
        for s in p.stages:
            mine = [i for i in layers if i.name.startswith(s.name + ".")]
            assert s.transformers == len(mine), s.name
            assert all(i.map_size(latent) == s.size and i.heads == s.heads for i in mine), s.name
        assert p.attention_layers == len(layers)
    assert viz.plan(sd15_layout(width=32), 512, 512).attention_layers == 16  # SD 1.5's 16 cross-attention layers
    p = viz.plan(sd3())
    assert [s.kind for s in p.stages] == ["embed", "joint", "out"] and p.stages[1].transformers == 2
    assert p.context == (77 + 256, 64)
    shipped = viz.plan(sdlens.load_pipeline("tiny-sd3"))  # its pooled input is cut: the drawing says so
    assert "carries nothing" in shipped.inputs[0] and "carries nothing" not in p.inputs[0]
    fig = viz.architecture(sdlens.load_pipeline("tiny"))
    text = " ".join(t.get_text() for t in fig.texts + fig.axes[0].texts)
    assert "timestep" in text and "cross-attention" in text and "down_blocks.1" in text

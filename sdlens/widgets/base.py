"""What every explorer shares: controls that redraw a picture, drawn as a PNG into an ``ipywidgets.Image``.

The live picture is composed with numpy and Pillow (no matplotlib), from the same frame functions
as the ``sdlens.viz`` figures, so a redraw takes milliseconds and shows the figure's pixels.
An explorer never runs the model: everything comes from the stored trace.

Headless use (tests, scripts)::

    ex = AttentionExplorer(tr, image)
    ex.controls["word"].value = 2            # any control; the picture redraws
    ex.render()                              # uint8 (H, W, 3): the current picture
    ex.displayed()                           # the same, decoded from the PNG the notebook shows
"""

from __future__ import annotations

import io
from collections import OrderedDict
from contextlib import contextmanager

import ipywidgets as W
import numpy as np
from PIL import Image

from ..viz.frames import as_rgb, colorize, heads_in, map_sizes, short_layer_name, size_label, upscale

ALL = "all"  # dropdown value: no selection (average over everything)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class Explorer:
    """Base of the explorers: ``controls`` (name → widget), ``render()``, and the widget tree ``ui``.

    Subclasses fill ``controls``, implement ``render()`` (the current picture, ``uint8 (H, W, 3)``)
    and ``describe()`` (an HTML line under it), and call ``_start()``.
    """

    def __init__(self, display_size: int = 320) -> None:
        self.display_size = display_size
        self.controls: dict[str, W.Widget] = {}
        self.image = W.Image(format="png")
        self.info = W.HTML()
        self.redraws = 0
        self.last: np.ndarray | None = None  # the picture of the last redraw
        self._holding = 0
        self._ui: W.Widget | None = None
        self._cache: OrderedDict = OrderedDict()

    # -------------------------------------------------------------- cache
    def cached(self, key, compute, max_items: int = 512):
        """``compute()``, remembered under ``key`` (frames and masses revisited while scrubbing or playing)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = compute()
        if len(self._cache) > max_items:
            self._cache.popitem(last=False)
        return value

    def clear_cache(self) -> None:
        self._cache.clear()

    # -------------------------------------------------------------- drawing
    def render(self) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def zoom(self, rgb: np.ndarray) -> int:
        """Integer enlargement of the live picture (nearest neighbour, so pixels stay exact)."""
        return max(1, self.display_size // max(rgb.shape[:2]))

    def redraw(self) -> None:
        """Recompute the picture from the controls and show it."""
        rgb = self.render()
        self.last = rgb
        self.image.value = png_bytes(upscale(rgb, self.zoom(rgb)))
        self.info.value = self.describe()
        self.redraws += 1

    def displayed(self) -> np.ndarray:
        """The picture shown now, decoded from the PNG, at the size of ``render()``."""
        shown = decode_png(self.image.value)
        k = shown.shape[0] // self.last.shape[0]
        return shown[::k, ::k]

    # -------------------------------------------------------------- controls
    @contextmanager
    def hold(self):
        """Change several controls with one redraw at the end."""
        with self.hold_silently():
            yield self
        if not self._holding:
            self.redraw()

    @contextmanager
    def hold_silently(self):
        """Change controls without any redraw (the caller's own change redraws)."""
        self._holding += 1
        try:
            yield self
        finally:
            self._holding -= 1

    def _changed(self, change) -> None:
        if not self._holding:
            self.redraw()

    def _start(self) -> None:
        for w in self.controls.values():
            if hasattr(w, "value") and not isinstance(w, W.Play):
                w.observe(self._changed, names="value")
        self.redraw()

    # -------------------------------------------------------------- display
    def layout(self) -> W.Widget:
        boxes = [w for w in self.controls.values()]
        return W.VBox([W.HBox([self.image, W.VBox(boxes)]), self.info])

    @property
    def ui(self) -> W.Widget:
        """The widget tree; a notebook shows it when the explorer is a cell's last value."""
        if self._ui is None:
            self._ui = self.layout()
        return self._ui

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)


class MapExplorer(Explorer):
    """An explorer of one kind of attention map (``kind``: ``"cross"`` or ``"self"``).

    Adds the controls both map explorers share — ``step`` (with ``play``), ``all_steps``,
    ``layers``, ``head`` and ``alpha`` — and their logic: moving the step slider unticks the
    average, choosing layers offers only their heads.
    """

    kind = "cross"

    def __init__(self, trace, image, *, prompt_index: int, cmap: str, scale, display_size: int) -> None:
        super().__init__(display_size)
        self.trace, self.prompt_index, self.cmap, self.scale = trace, prompt_index, cmap, scale
        self.base = None if image is None else as_rgb(image)

    def _add_map_controls(self, alpha: float) -> None:
        c, trace = self.controls, self.trace
        c.update(step_controls(trace))
        c["layers"] = W.Dropdown(options=layer_options(trace, self.kind), value=ALL, description="layers")
        c["head"] = W.Dropdown(options=head_options(heads_in(trace, None, self.kind)), value=ALL,
                               description="head", disabled=trace.head_indices is None)
        c["alpha"] = W.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="opacity")
        c["step"].observe(self._step_moved, names="value")
        c["layers"].observe(self._layers_changed, names="value")
        self.bar = colorbar_strip(self.cmap)

    def _step_moved(self, change) -> None:
        if self.controls["all_steps"].value:  # looking at one step means not averaging over them
            with self.hold_silently():
                self.controls["all_steps"].value = False

    def _layers_changed(self, change) -> None:
        """Offer the heads of the chosen layers, keeping the current head where it still exists."""
        if self.trace.head_indices is None:
            return
        head = self.controls["head"]
        heads = heads_in(self.trace, layers_value(change["new"]), self.kind)
        with self.hold_silently():
            keep = head.value if head.value in heads else ALL
            head.options = head_options(heads)
            head.value = keep

    def view_settings(self) -> dict:
        """The settings of the shared controls, as keyword arguments of the viz functions."""
        c = self.controls
        head = c["head"].value
        return dict(
            prompt_index=self.prompt_index,
            steps=None if c["all_steps"].value else [c["step"].value],
            layers=layers_value(c["layers"].value),
            heads=None if head == ALL else head,
            alpha=c["alpha"].value,
            cmap=self.cmap,
            scale=self.scale,
        )

    def settings(self) -> dict:
        raise NotImplementedError

    def frame(self):
        raise NotImplementedError

    def render(self) -> np.ndarray:
        self._frame = self.frame()  # describe() reads its label and colour range
        return self._frame.rgb

    def cached_frame(self, make):
        """``make(trace, target, base, **settings)`` of the current settings (the first one being the
        target: a word or a pixel), remembered while scrubbing."""
        s = self.settings()
        key = ("frame", *(tuple(v) if isinstance(v, list) else v for v in s.values()))
        target = s.pop(next(iter(s)))
        return self.cached(key, lambda: make(self.trace, target, self.base, **s))


# -------------------------------------------------------------- shared controls
def step_controls(trace, *, average: bool = True, interval_ms: int = 400) -> dict[str, W.Widget]:
    """A step slider (values: captured step indices) with a play button, and an 'average over steps' box."""
    options = [(str(s), s) for s in trace.steps]
    step = W.SelectionSlider(options=options, value=trace.steps[-1], description="step", continuous_update=True)
    play = W.Play(min=0, max=max(0, len(options) - 1), value=len(options) - 1, interval=interval_ms, description="play")
    W.jslink((play, "value"), (step, "index"))
    avg = W.Checkbox(value=average, description="average over all steps", indent=False)
    return {"step": step, "play": play, "all_steps": avg}


def layer_options(trace, kind: str) -> list[tuple[str, str]]:
    """Dropdown options: all layers, each map size, each layer."""
    names = trace.layers_of(kind)
    opts = [("all layers", ALL)]
    for s in map_sizes(trace, kind):
        n = sum(s in trace.map_size(x) for x in names)
        opts.append((f"{s}×{s} maps ({n} layer{'s' * (n != 1)})", f"size:{s}"))
    opts += [(f"{short_layer_name(n)} · {size_label(trace.map_size(n))}", n) for n in names]
    return opts


def layers_value(v: str):
    """The ``layers=`` selector of a layer dropdown value."""
    if v == ALL:
        return None
    if v.startswith("size:"):
        return int(v[5:])
    return v


def head_options(heads: list[int]) -> list[tuple[str, object]]:
    return [("mean of heads", ALL)] + [(f"head {h}", h) for h in heads]


def colorbar_strip(cmap: str, width: int = 256, height: int = 10) -> W.Image:
    """A small image of the colour map (low → high), shown under the picture."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return W.Image(value=png_bytes(colorize(ramp, 0.0, 1.0, cmap)), format="png")

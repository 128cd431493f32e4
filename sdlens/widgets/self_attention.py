"""``SelfAttentionExplorer``: point at a pixel and see where it attends, per step, layer and head."""

from __future__ import annotations

import ipywidgets as W

from ..errors import CaptureError
from ..viz.frames import image_size_of, layers_label, self_frame, step_label
from ..viz.style import HEAT_CMAP
from ..vocabulary import renamed
from .base import MapExplorer


class SelfAttentionExplorer(MapExplorer):
    """Pick a query pixel (sliders ``y``, ``x``; or a click, when ``ipyevents`` is installed), a step, a layer.

    Controls (``.controls``): ``y``, ``x`` (in the image's pixels), ``step`` (with ``play``),
    ``all_steps``, ``layers``, ``head`` (when heads were kept), ``alpha``. The picture is
    ``viz.self_frame`` of those settings: the same pixels as
    ``viz.self_attention_map(trace, **explorer.settings())``. Needs a trace with ``self_attn=True``.
    """

    kind = "self"

    @renamed(prompt="prompt_index")
    def __init__(
        self,
        trace,
        image=None,
        *,
        prompt_index: int = 0,
        pixel: tuple[int, int] | None = None,
        alpha: float = 0.6,
        cmap: str = HEAT_CMAP,
        scale="each",
        display_size: int = 320,
    ) -> None:
        if "self" not in trace.kinds:
            raise CaptureError("this trace has no self-attention: trace with sdlens.trace(pipe, self_attn=True)")
        super().__init__(trace, image, prompt_index=prompt_index, cmap=cmap, scale=scale, display_size=display_size)
        self.size = image_size_of(trace, self.base)
        y0, x0 = pixel if pixel is not None else (self.size[0] // 2, self.size[1] // 2)
        c = self.controls
        c["y"] = W.IntSlider(value=y0, min=0, max=self.size[0] - 1, description="pixel y")
        c["x"] = W.IntSlider(value=x0, min=0, max=self.size[1] - 1, description="pixel x")
        self._add_map_controls(alpha)
        self._click_events = self._attach_click()
        self._start()

    def _attach_click(self):
        try:
            from ipyevents import Event
        except ImportError:  # clicking needs ipyevents; the sliders always work
            return None
        ev = Event(source=self.image, watched_events=["click"])
        ev.on_dom_event(self.on_click)
        return ev

    def on_click(self, event: dict) -> None:
        """Move the query pixel to a click (an ipyevents event: relative position and the drawn size)."""
        h, w = self.size
        y = int(event["relativeY"] / max(event["boundingRectHeight"], 1) * h)
        x = int(event["relativeX"] / max(event["boundingRectWidth"], 1) * w)
        with self.hold():
            self.controls["y"].value = min(max(y, 0), h - 1)
            self.controls["x"].value = min(max(x, 0), w - 1)

    def settings(self) -> dict:
        """The current settings as keyword arguments of ``viz.self_attention_map`` / ``viz.self_frame``."""
        return dict(pixel=(self.controls["y"].value, self.controls["x"].value), **self.view_settings())

    def frame(self):
        """The current ``Frame`` (``viz.self_frame`` of ``settings()``)."""
        return self.cached_frame(self_frame)

    def describe(self) -> str:
        s, f = self.settings(), self._frame
        steps = "mean of all steps" if s["steps"] is None else step_label(self.trace, s["steps"][0])
        heads = "mean of heads" if s["heads"] is None else f"head {s['heads']}"
        return (
            f"<b>{f.label}</b> attends here · {steps} · {layers_label(self.trace, s['layers'], 'self')} · "
            f"{heads} · colours {f.vmin:.3g} → {f.vmax:.3g}"
        )

    def layout(self) -> W.Widget:
        c = self.controls
        panel = W.VBox([c["y"], c["x"], W.HBox([c["play"], c["step"]]), c["all_steps"], c["layers"], c["head"],
                        c["alpha"]])
        return W.VBox([W.HBox([W.VBox([self.image, self.bar]), panel]), self.info])

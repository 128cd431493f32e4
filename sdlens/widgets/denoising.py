"""``DenoisingExplorer``: scrub through the steps and watch noise become an image."""

from __future__ import annotations

import ipywidgets as W
import numpy as np

from ..errors import CaptureError
from ..viz.frames import denoising_frame, has_previews, side_by_side, step_label
from ..vocabulary import renamed
from .base import Explorer


class DenoisingExplorer(Explorer):
    """A step slider (with play) showing x_t (the noisy latent, decoded), the predicted clean image x0
    and the noise level of the step.

    Needs a trace recorded with ``sdlens.trace(pipe, record_latents=True)``. The picture is x_t and
    x0 side by side, 4 white columns apart: the two images that ``viz.denoising(trace, step)`` draws.
    """

    GAP = 4

    @renamed(prompt="prompt_index", image="image_index")
    def __init__(self, trace, *, prompt_index: int = 0, image_index: int = 0, display_size: int = 256) -> None:
        super().__init__(display_size)
        if not has_previews(trace):
            raise CaptureError(
                "this trace has no denoising previews: trace with sdlens.trace(pipe, record_latents=True)"
            )
        self.trace, self.prompt_index, self.image_index = trace, prompt_index, image_index
        options = [(str(s), s) for s in trace.steps]
        step = W.SelectionSlider(options=options, value=trace.steps[0], description="step")
        play = W.Play(min=0, max=max(0, len(options) - 1), value=0, interval=300, description="play")
        W.jslink((play, "value"), (step, "index"))
        self.controls = {"step": step, "play": play}
        levels = getattr(trace, "noise_levels", None)
        top = max((float(v) for v in levels), default=1.0) if levels is not None else 1.0
        self.noise_bar = W.FloatProgress(value=0.0, min=0.0, max=max(1.0, top), description="noise")
        self._start()

    def zoom(self, rgb: np.ndarray) -> int:
        return max(1, self.display_size // rgb.shape[0])  # each of the two images is display_size high

    def settings(self) -> dict:
        """The current settings as keyword arguments of ``viz.denoising`` / ``viz.denoising_frame``."""
        return dict(step=self.controls["step"].value, prompt_index=self.prompt_index, image_index=self.image_index)

    def frame(self):
        return denoising_frame(self.trace, **self.settings())

    def render(self) -> np.ndarray:
        d = self._frame = self.frame()
        pics = [p for p in (d.xt, d.x0) if p is not None]
        return side_by_side(pics, self.GAP)

    def describe(self) -> str:
        d = self._frame
        if d.noise is not None:
            self.noise_bar.value = d.noise
        return f"{step_label(self.trace, d.step)} &nbsp; <i>left</i>: x_t (what the denoiser sees) · " \
               f"<i>right</i>: the clean image it predicts (x0)"

    def layout(self) -> W.Widget:
        c = self.controls
        return W.VBox([W.HBox([c["play"], c["step"]]), self.image, self.noise_bar, self.info])

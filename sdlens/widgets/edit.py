"""``EditExplorer``: sliders for an attention edit's settings, re-running the edit when one is released.

Unlike the trace explorers, this one runs the model: each new combination of settings is one call
of ``sdlens.edit`` (about a second on a CPU with the built-in model), remembered, so going back to
a setting shows it at once. Sliders update on release, not while dragging.
"""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from ..errors import EditError
from ..select import check_choice
from ..tokens import tokenize
from ..viz.frames import as_rgb, side_by_side
from ..vocabulary import renamed
from .base import Explorer

FILLER = frozenset("a an the on in at of and or to with".split())


class EditExplorer(Explorer):
    """Base, edited and (with a local blend) the blend mask, side by side.

    Controls: ``method`` (replace or refine), ``cross_window`` and ``self_window`` (ranges of step
    fractions), ``blend`` (on or off) and ``threshold``, and one ``weight:WORD`` slider per content
    word of the target prompt. ``edits`` counts the model runs (cached settings do not run it).

    Headless use::

        ex = EditExplorer(pipe, "a red circle", "a blue circle", seed=3)
        ex.controls["threshold"].value = 0.4     # re-runs the edit (or takes it from the cache)
        ex.result.images, ex.render()

    ``image=`` (and ``inversion=``): edit that picture instead; it is inverted once, when the
    explorer is made, and the sliders edit that inversion.
    """

    GAP = 4

    @renamed(steps="num_inference_steps", guidance="guidance_scale")
    def __init__(self, pipe, base: str, target: str, *, seed: int = 0, num_inference_steps: int = 25,
                 guidance_scale: float = 7.5, method: str = "replace", blend_words=None, image=None,
                 inversion: str = "ddim", display_size: int = 192, **pipe_kwargs) -> None:
        super().__init__(display_size)
        check_choice(method, ("replace", "refine"), what="method", error=EditError)
        self.pipe, self.base, self.target, self.seed = pipe, base, target, seed
        self.call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **pipe_kwargs)
        self.inversion = None  # with image=: inverted once here, every setting edits that inversion
        if image is not None:
            from ..edit import invert
            from ..edit.inversion import as_image_array
            from ..hooks.layers import latent_size_of

            arr = as_image_array(image)
            self.call.update(height=arr.shape[0], width=arr.shape[1])
            latent = latent_size_of(pipe, arr.shape[0], arr.shape[1])
            self.inversion = invert(pipe, arr, base, latent, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, inversion=inversion)
        self.edits = 0
        target_tok = tokenize(target, pipe.tokenizer)
        self.weight_words = [w for w in dict.fromkeys(target_tok.words) if w.lower() not in FILLER]
        if blend_words is None:  # the words that differ, and what the target adds
            base_words = set(tokenize(base, pipe.tokenizer).words)
            blend_words = [w for w in self.weight_words if w not in base_words] or self.weight_words[-1:]
        self.blend_words = list(blend_words)
        slider = dict(min=0.0, max=1.0, step=0.05, continuous_update=False, readout_format=".2f")
        c = self.controls
        c["method"] = W.Dropdown(options=["replace", "refine"], value=method, description="method")
        c["cross_window"] = W.FloatRangeSlider(value=(0.0, 1.0), description="cross window", **slider)
        c["self_window"] = W.FloatRangeSlider(value=(0.0, 0.0), description="self window", **slider)
        c["blend"] = W.Checkbox(value=False, description=f"local blend on {', '.join(self.blend_words)}")
        c["threshold"] = W.FloatSlider(value=0.6, description="threshold", **slider)
        for w in self.weight_words:
            c[f"weight:{w}"] = W.FloatSlider(value=1.0, min=-10.0, max=10.0, step=0.5, continuous_update=False,
                                             description=f"weight {w}")
        self.result = None
        self._start()

    def settings(self) -> dict:
        """The current settings as keyword arguments of ``sdlens.edit.edit``."""
        c = self.controls
        weights = {w: c[f"weight:{w}"].value for w in self.weight_words if c[f"weight:{w}"].value != 1.0}
        return dict(method=c["method"].value, cross_window=tuple(c["cross_window"].value),
                    self_window=tuple(c["self_window"].value),
                    blend={"words": self.blend_words, "threshold": c["threshold"].value} if c["blend"].value else None,
                    weights=weights or None)

    def run(self):
        """The edit at the current settings (from the cache when it ran before)."""
        from ..edit import edit

        s = self.settings()
        key = repr(sorted(s.items()))

        def compute():
            self.edits += 1
            return edit(self.pipe, self.base, self.target, seed=self.seed, image=self.inversion, output_type="np",
                        **s, **self.call)

        return self.cached(key, compute, max_items=64)

    def render(self) -> np.ndarray:
        self.result = r = self.run()
        pics = [as_rgb(im) for im in r.images[:2]]
        if r.masks is not None:
            m = r.masks[0, 0].numpy()
            h, w = pics[0].shape[:2]
            m = np.kron(m, np.ones((h // m.shape[0], w // m.shape[1])))
            pics.append(as_rgb((m * 255).astype(np.uint8)))
        return side_by_side(pics, self.GAP)

    def zoom(self, rgb: np.ndarray) -> int:
        return max(1, self.display_size // rgb.shape[0])

    def describe(self) -> str:
        left = ("the image, reconstructed from its inversion with " if self.inversion is not None else "") + self.base
        parts = ["<i>left</i>: " + html.escape(left), "<i>middle</i>: " + html.escape(self.target)]
        if self.result is not None and self.result.masks is not None:
            parts.append("<i>right</i>: the blend mask (edited where white)")
        return " &nbsp;·&nbsp; ".join(parts) + f" &nbsp; ({self.edits} runs of the model so far)"

    def layout(self) -> W.Widget:
        return W.VBox([self.image, self.info, W.VBox(list(self.controls.values()))])


__all__ = ["EditExplorer"]

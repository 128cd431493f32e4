"""``AttentionExplorer``: a word's cross-attention over the image, by step, layer and head."""

from __future__ import annotations

import html

import ipywidgets as W

from ..viz.frames import (
    SPECIALS,
    as_rgb,
    format_share,
    heads_in,
    layers_label,
    overlay_frame,
    resolve_target,
    slot_mass,
    step_label,
)
from .base import ALL, Explorer, colorbar_strip, head_options, layer_options, layers_value, step_controls


def target_options(trace, prompt: int = 0) -> list[tuple[str, object]]:
    """Dropdown options: the words, then the start/end/padding slots, then every token slot (``#i token``)."""
    tok = trace.tokenization(prompt)
    opts, seen = [], {}
    for i, w in enumerate(tok.words):
        seen[w] = seen.get(w, 0) + 1
        opts.append((w if seen[w] == 1 else f"{w} ({seen[w]})", i))
    opts += [(s, s) for s in SPECIALS if s[1:-1] in tok.kinds]
    labels = trace.tokens(prompt)
    opts += [(f"#{i} {labels[i]}", ("slot", i)) for i, k in enumerate(tok.kinds) if k != "pad"]
    return opts


class AttentionExplorer(Explorer):
    """Pick a word (or token, or the start/end/padding slots), a step, a layer or map size, a head.

    Controls (``.controls``): ``word``, ``step`` (with ``play``), ``all_steps`` (average over the
    steps; moving the step slider unticks it), ``layers``, ``head`` (when the trace kept heads),
    ``alpha`` (opacity of the map over the image). The picture is ``viz.overlay_frame`` of those
    settings: the same pixels as ``viz.overlay(trace, **explorer.settings())``.

    Example::

        with sdlens.trace(pipe, heads="all") as tr:
            image = pipe("a red circle on the left").images[0]
        AttentionExplorer(tr, image)          # last line of a cell: shows the explorer
    """

    def __init__(
        self,
        trace,
        image=None,
        *,
        prompt: int = 0,
        word=None,
        alpha: float = 0.6,
        cmap: str = "jet",
        scale="each",
        display_size: int = 320,
    ) -> None:
        super().__init__(display_size)
        self.trace, self.prompt, self.cmap, self.scale = trace, prompt, cmap, scale
        self.base = None if image is None else as_rgb(image)
        options = target_options(trace, prompt)
        values = [v for _, v in options]
        first = word if word is not None else (values[0] if values else None)
        if isinstance(first, str) and first not in SPECIALS:
            first = trace.tokenization(prompt).word_index(first)
        c = self.controls
        c["word"] = W.Dropdown(options=options, value=first, description="word")
        c.update(step_controls(trace))
        c["layers"] = W.Dropdown(options=layer_options(trace, "cross"), value=ALL, description="layers")
        heads = heads_in(trace, None)
        c["head"] = W.Dropdown(options=head_options(heads), value=ALL, description="head",
                               disabled=trace.head_indices is None)
        c["alpha"] = W.FloatSlider(value=alpha, min=0.0, max=1.0, step=0.05, description="opacity")
        c["step"].observe(self._step_moved, names="value")
        c["layers"].observe(self._layers_changed, names="value")
        self.bar = colorbar_strip(cmap)
        self._start()

    # -------------------------------------------------------------- control logic
    def _step_moved(self, change) -> None:
        if self.controls["all_steps"].value:  # looking at one step means not averaging over them
            self._holding += 1
            try:
                self.controls["all_steps"].value = False
            finally:
                self._holding -= 1

    def _layers_changed(self, change) -> None:
        self._refresh_heads(layers_value(change["new"]), "cross")

    # -------------------------------------------------------------- settings and picture
    def settings(self) -> dict:
        """The current settings as keyword arguments of ``viz.overlay`` / ``viz.overlay_frame``."""
        c = self.controls
        head = c["head"].value
        return dict(
            word=c["word"].value,
            prompt=self.prompt,
            steps=None if c["all_steps"].value else [c["step"].value],
            layers=layers_value(c["layers"].value),
            heads=None if head == ALL else head,
            alpha=c["alpha"].value,
            cmap=self.cmap,
            scale=self.scale,
        )

    def frame(self):
        """The current ``Frame`` (``viz.overlay_frame`` of ``settings()``)."""
        s = self.settings()
        key = ("frame", *(tuple(v) if isinstance(v, list) else v for v in s.values()))
        return self.cached(key, lambda: overlay_frame(self.trace, s.pop("word"), self.base, **s))

    def share(self) -> float:
        """Share of the attention mass that the chosen slots take (``viz.attention_share`` of the settings)."""
        s = self.settings()
        sel = dict(prompt=self.prompt, steps=s["steps"] and tuple(s["steps"]), layers=s["layers"], heads=s["heads"])
        slots = resolve_target(self.trace, s["word"], self.prompt).slots
        n_keys = len(self.trace.tokens(self.prompt))
        part = self.cached(("mass", slots, *sel.values()), lambda: slot_mass(self.trace, slots, **sel))
        total = self.cached(("mass", "all", *sel.values()), lambda: slot_mass(self.trace, range(n_keys), **sel))
        return part / total if total > 0 else 0.0

    def render(self):
        self._frame = self.frame()
        return self._frame.rgb

    def describe(self) -> str:
        s, f = self.settings(), self._frame
        steps = "mean of all steps" if s["steps"] is None else step_label(self.trace, s["steps"][0])
        heads = "mean of heads" if s["heads"] is None else f"head {s['heads']}"
        share = self.share()
        return (
            f"<b>{html.escape(f.label)}</b> · {format_share(share)} of the attention · {steps} · "
            f"{html.escape(layers_label(self.trace, s['layers']))} · {heads} · colours {f.vmin:.3g} → {f.vmax:.3g}"
        )

    def layout(self) -> W.Widget:
        c = self.controls
        step_row = W.HBox([c["play"], c["step"]])
        panel = W.VBox([c["word"], step_row, c["all_steps"], c["layers"], c["head"], c["alpha"]])
        return W.VBox([W.HBox([W.VBox([self.image, self.bar]), panel]), self.info])

"""``AttentionExplorer``: a word's cross-attention over the image, by step, layer and head."""

from __future__ import annotations

import html

import ipywidgets as W

from ..errors import CaptureError
from ..viz.frames import (
    DIRECTION_TITLES,
    SPECIALS,
    attention_share,
    format_share,
    layers_label,
    overlay_frame,
    step_label,
)
from ..viz.style import HEAT_CMAP
from ..vocabulary import renamed
from .base import MapExplorer


def target_options(trace, prompt_index: int = 0) -> list[tuple[str, object]]:
    """Dropdown options: the words, then the start/end/padding slots, then every token slot (``#i token``)."""
    tok = trace.tokenization(prompt_index)
    opts: list[tuple[str, object]] = [(label, i) for i, label in enumerate(tok.word_labels)]  # "red (2)" for repeats
    opts += [(s, s) for s in SPECIALS if s[1:-1] in tok.kinds]
    labels = trace.tokens(prompt_index)
    opts += [(f"#{i} {labels[i]}", ("slot", i)) for i, k in enumerate(tok.kinds) if k != "pad"]
    return opts


def initial_target(trace, word, prompt_index: int, values: list):
    """The dropdown value for ``word``: a word, its label (``"red (2)"``), a word index, a special
    slot name or ``("slot", i)``; ``None`` picks the first word."""
    if word is None:
        return values[0] if values else None
    if not isinstance(word, bool) and any(type(word) is type(v) and word == v for v in values):
        return word
    if isinstance(word, str):
        return trace.word_index(word, prompt_index)  # a CaptureError naming the choices
    raise CaptureError(
        f"word={word!r} is not one of the explorer's choices: a word or label of the prompt "
        f"{trace.tokenization(prompt_index).word_labels}, a word index, one of {', '.join(SPECIALS)}, or ('slot', i)"
    )


class AttentionExplorer(MapExplorer):
    """Pick a word (or token, or the start/end/padding slots), a step, a layer or map size, a head.

    Controls (``.controls``): ``word``, ``step`` (with ``play``), ``all_steps`` (average over the
    steps; moving the step slider unticks it), ``layers``, ``head`` (when the trace kept heads),
    ``alpha`` (opacity of the map over the image), and, for a joint-attention trace with the text
    tokens' queries (``text_attn=True``), ``direction`` (pixels → word, word → pixels, both; as
    ``AttentionTrace.word_map``). The picture is ``viz.overlay_frame`` of those settings: the same
    pixels as ``viz.overlay(trace, **explorer.settings())``.

    Example::

        with sdlens.trace(pipe, heads="all") as tr:
            image = pipe("a red circle on the left").images[0]
        AttentionExplorer(tr, image)          # last line of a cell: shows the explorer
    """

    @renamed(prompt="prompt_index")
    def __init__(
        self,
        trace,
        image=None,
        *,
        prompt_index: int = 0,
        word=None,
        alpha: float = 0.6,
        cmap: str = HEAT_CMAP,
        scale="each",
        display_size: int = 320,
    ) -> None:
        super().__init__(trace, image, prompt_index=prompt_index, cmap=cmap, scale=scale, display_size=display_size)
        options = target_options(trace, prompt_index)
        values = [v for _, v in options]
        self.controls["word"] = W.Dropdown(options=options, value=initial_target(trace, word, prompt_index, values),
                                           description="word")
        self._add_map_controls(alpha)
        if "text_image" in trace.kinds:  # joint attention read both ways
            self.controls["direction"] = W.Dropdown(
                options=[(title, d) for d, title in DIRECTION_TITLES.items()], value="image_text",
                description="direction")
            # only a word has its own tokens' rows: a slot or special target goes with the pixels' maps
            # (observed before _start's redraw, so the picture is drawn once, from consistent settings)
            self.controls["direction"].observe(self._direction_changed, names="value")
            self.controls["word"].observe(self._target_changed, names="value")
        self._start()

    def _direction_changed(self, change) -> None:
        word = self.controls["word"]
        if change["new"] != "image_text" and not isinstance(word.value, int):
            with self.hold_silently():
                word.value = next(v for _, v in word.options if isinstance(v, int))

    def _target_changed(self, change) -> None:
        if not isinstance(change["new"], int):
            with self.hold_silently():
                self.controls["direction"].value = "image_text"

    # -------------------------------------------------------------- settings and picture
    def settings(self) -> dict:
        """The current settings as keyword arguments of ``viz.overlay`` / ``viz.overlay_frame``."""
        out = dict(word=self.controls["word"].value, **self.view_settings())
        if "direction" in self.controls:
            out["direction"] = self.controls["direction"].value
        return out

    def frame(self):
        """The current ``Frame`` (``viz.overlay_frame`` of ``settings()``)."""
        return self.cached_frame(overlay_frame)

    def share(self) -> float:
        """Share of the attention mass that the chosen slots take (``viz.attention_share`` of the settings)."""
        s = self.settings()
        sel = dict(prompt_index=self.prompt_index, steps=s["steps"], layers=s["layers"], heads=s["heads"])
        key = ("share", s["word"], *(tuple(v) if isinstance(v, list) else v for v in sel.values()))
        return self.cached(key, lambda: attention_share(self.trace, s["word"], **sel))

    def describe(self) -> str:
        s, f = self.settings(), self._frame
        steps = "mean of all steps" if s["steps"] is None else step_label(self.trace, s["steps"][0])
        heads = "mean of heads" if s["heads"] is None else f"head {s['heads']}"
        direction = s.get("direction", "image_text")
        read = (f"{format_share(self.share())} of the attention" if direction == "image_text"
                else dict(text_image="where the word looks", both="where pixels and word agree")[direction])
        return (
            f"<b>{html.escape(f.label)}</b> · {read} · {steps} · "
            f"{html.escape(layers_label(self.trace, s['layers']))} · {heads} · colours {f.vmin:.3g} → {f.vmax:.3g}"
        )

    def layout(self) -> W.Widget:
        c = self.controls
        step_row = W.HBox([c["play"], c["step"]])
        panel = W.VBox([c["word"], *([c["direction"]] if "direction" in c else []), step_row, c["all_steps"],
                        c["layers"], c["head"], c["alpha"]])
        return W.VBox([W.HBox([W.VBox([self.image, self.bar]), panel]), self.info])

"""Figures without pyplot: no global figure list to leak, no GUI backend, and they still show in notebooks."""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .frames import Frame


class LensFigure(Figure):
    """A matplotlib ``Figure`` on the Agg canvas that Jupyter shows as a PNG (``_repr_png_``)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def new_figure(figsize=(4.0, 4.0), **kw) -> LensFigure:
    fig = LensFigure(figsize=figsize, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def panel_grid(n: int, ncols: int | None = None, panel: float = 2.4, extra_width: float = 0.0):
    """A figure with ``n`` panels in rows of ``ncols``; unused axes are removed. Returns ``(fig, axes)``."""
    ncols = max(1, min(n, ncols or min(n, 6)))
    nrows = math.ceil(n / ncols)
    fig = new_figure(figsize=(panel * ncols + extra_width, panel * nrows + 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def figure_and_ax(ax, figsize=(4.0, 4.0)):
    """``ax``'s figure and ``ax``, or a new one-panel figure."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize=figsize)
    return fig, fig.add_subplot()


def show_rgb(ax, rgb: np.ndarray, title: str | None = None) -> None:
    """Draw ``rgb`` pixel for pixel (no smoothing), without ticks."""
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)


def colorbar(fig, frame: Frame, ax, label: str | None = "attention"):
    """A colour bar of ``frame``'s colour map and range beside ``ax`` (or a list of axes)."""
    sm = ScalarMappable(norm=Normalize(frame.vmin, frame.vmax), cmap=frame.cmap)
    cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02)
    if label:
        cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return cb


def draw_frame(ax, frame: Frame, title: str | None = None, *, bar: bool = True, bar_label: str | None = "attention"):
    """Draw a ``Frame`` in ``ax``: its pixels, its title, and (``bar``) its colour bar."""
    show_rgb(ax, frame.rgb, frame.label if title is None else title)
    if bar:
        colorbar(ax.figure, frame, ax, bar_label)


def wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text

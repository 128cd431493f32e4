"""The plotting conventions every sdlens figure and notebook shares, so that a fix lands everywhere.

- ``HEAT_CMAP``: attention is drawn with a perceptually uniform colour map (equal steps in
  attention look like equal steps in colour, and it reads the same in grey), dark for little
  attention, bright for much. Rainbow maps such as "jet" invent edges where the hue changes.
- ``annotate_cells``: numbers written on a heat map in dark text on light cells and light text on
  dark ones, two decimals by default.
- ``outline``: a mask drawn as a contour over a picture, so the picture stays visible; a mask on its
  own is drawn framed, so that white on a white page still has an edge.
"""

from __future__ import annotations

import numpy as np

HEAT_CMAP = "inferno"


def text_color(value: float, vmin: float, vmax: float, cmap: str = HEAT_CMAP) -> str:
    """"black" on a cell whose colour is light, "white" on a dark one (relative luminance, sRGB)."""
    from matplotlib import colormaps

    t = 0.5 if vmax <= vmin else float(np.clip((value - vmin) / (vmax - vmin), 0.0, 1.0))
    r, g, b, _ = colormaps[cmap](t)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def annotate_cells(ax, values, *, vmin: float, vmax: float, cmap: str = HEAT_CMAP, fmt: str = "{:.2f}",
                   fontsize: float = 8) -> None:
    """Write each finite value of ``values (rows, cols)`` on its cell of an ``imshow`` drawn with
    the same ``cmap``, ``vmin`` and ``vmax``."""
    for (r, c), v in np.ndenumerate(np.asarray(values, dtype=float)):
        if np.isfinite(v):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                    color=text_color(v, vmin, vmax, cmap))


def outline(ax, mask, color: str = "white", linewidth: float = 1.0) -> None:
    """Draw the edge of a boolean ``mask (H, W)`` on ``ax`` (pixel coordinates, as ``imshow``)."""
    m = np.asarray(mask, dtype=float)
    if m.any() and not m.all():
        ax.contour(m, levels=[0.5], colors=color, linewidths=linewidth)


def framed_mask(ax, mask, title: str | None = None) -> None:
    """A mask on its own: white object on black, with a frame and no ticks."""
    ax.imshow(np.asarray(mask, dtype=float), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("0.4")
    if title is not None:
        ax.set_title(title, fontsize=9)

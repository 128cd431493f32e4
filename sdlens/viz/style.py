"""The plotting conventions every sdlens figure and notebook shares, so that a fix lands everywhere.

- ``HEAT_CMAP``: attention is drawn with a perceptually uniform colour map (equal steps in
  attention look like equal steps in colour, and it reads the same in grey), dark for little
  attention, bright for much. Rainbow maps such as "jet" invent edges where the hue changes.
- ``underlay``: a heat map laid over a picture is laid over the picture's luminance, faded towards
  grey: the heat map's colours are the only colours in the panel, so a red or yellow object cannot
  pass for attention, and the objects' outlines still show where they are.
- Panels that are compared (one per word) share one colour scale with one colour bar by default
  (``viz.word_grid(scale="shared")``): on its own scale a faint word would look as bright as a
  strong one. A single map has its own colour bar.
- ``annotate_cells``: numbers written on a heat map in dark text on light cells and light text on
  dark ones, two decimals by default.
- ``outline``: a mask drawn as a contour over a picture, so the picture stays visible; a mask on its
  own is drawn framed, so that white on a white page still has an edge.
- ``overlap``: a predicted region against a true mask in four named colours with a legend (neither,
  region only, mask only, both), never as numbers to be decoded from a colour bar.
"""

from __future__ import annotations

import numpy as np

from ..errors import CaptureError

HEAT_CMAP = "inferno"
UNDERLAY_FADE = 0.55  # how far the picture's grey is pulled towards mid-grey under a heat map


def underlay(image: np.ndarray) -> np.ndarray:
    """``image (H, W, 3)`` uint8 → its luminance, faded towards mid-grey, as uint8 ``(H, W, 3)``: the
    picture a heat map is drawn over (see the module's notes)."""
    rgb = np.asarray(image, dtype=np.float32)
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    grey = (1.0 - UNDERLAY_FADE) * lum + UNDERLAY_FADE * 128.0
    return np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)


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


# neither, region only, mask only, both: light grey, orange, blue, green (tell apart in colour-blind
# vision too: the three colours differ in lightness as well as hue)
OVERLAP_COLOURS = ((0.92, 0.92, 0.92), (0.96, 0.56, 0.15), (0.25, 0.45, 0.85), (0.18, 0.62, 0.30))
OVERLAP_LABELS = ("neither", "region only", "mask only", "both")


def overlap(ax, region, mask, *, region_label: str = "region", mask_label: str = "mask",
            legend: bool = True) -> None:
    """Draw boolean ``region (H, W)`` against boolean ``mask (H, W)``: each pixel in the colour of
    neither / region only / mask only / both, framed, with a legend naming the four."""
    from matplotlib.patches import Patch

    r, m = np.asarray(region, dtype=bool), np.asarray(mask, dtype=bool)
    if r.shape != m.shape:
        raise CaptureError(f"overlap needs a region and a mask of one shape; got {r.shape} and {m.shape}")
    code = r.astype(int) + 2 * m.astype(int)  # 0 neither, 1 region only, 2 mask only, 3 both
    ax.imshow(np.asarray(OVERLAP_COLOURS)[code], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("0.4")
    if legend:
        labels = ("neither", f"{region_label} only", f"{mask_label} only", "both")
        handles = [Patch(facecolor=c, edgecolor="0.4", label=t) for c, t in zip(OVERLAP_COLOURS, labels)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)

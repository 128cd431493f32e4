"""Self-attention views: where one pixel attends, and a segmentation of the image from all pixels' rows.

Self-attention is ``(h·w) × (h·w)`` per layer: row ``q`` says which pixels the pixel ``q`` reads
from. Pixels of one object read from the same places, so their rows are alike: the principal
components of the rows, shown as colours, and k-means clusters of the rows both outline objects
without any text.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import maps as _maps
from ..analysis.segmentation import segment
from ..vocabulary import renamed
from ._figure import draw_frame, figure_and_ax, new_figure, show_rgb
from .frames import as_rgb, blend, image_size_of, layers_label, self_frame
from .style import HEAT_CMAP, underlay


@renamed(prompt="prompt_index")
def self_attention_map(
    trace,
    pixel: tuple[int, int],
    image=None,
    *,
    prompt_index: int = 0,
    steps=None,
    layers=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="each",
    marker: bool = True,
    colorbar: bool = True,
    ax=None,
):
    """Where the pixel ``(y, x)`` of ``image`` attends by self-attention; the pixel is marked with a cross.

    Needs a trace captured with ``self_attn=True``. ``steps``, ``layers``, ``heads`` select as in
    ``AttentionTrace.self_map``. Returns the Figure.
    """
    fig, ax = figure_and_ax(ax)
    frame = self_frame(
        trace, pixel, image, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads,
        alpha=alpha, cmap=cmap, scale=scale, marker=marker,
    )
    draw_frame(ax, frame, f"self-attention of {frame.label}\n{layers_label(trace, layers, 'self')}", bar=colorbar)
    return fig


def label_colors(labels: np.ndarray, cmap: str = "tab10") -> np.ndarray:
    """``uint8 (H, W, 3)``: a distinct colour per cluster label."""
    from matplotlib import colormaps

    table = np.round(np.asarray(colormaps[cmap].colors)[:, :3] * 255).astype(np.uint8)  # a listed colour map
    return table[np.asarray(labels) % len(table)]


@renamed(prompt="prompt_index")
def self_attention_segments(
    trace,
    image=None,
    n_clusters: int = 4,
    *,
    prompt_index: int = 0,
    steps=None,
    layers=None,
    heads=None,
    alpha: float = 0.55,
    seed: int = 0,
):
    """The image, the principal components of its self-attention rows as RGB, and their k-means clusters.

    ``layers``: layers of one map size (default: the largest self-attention maps). The components
    and clusters are computed on the layer grid and enlarged to the image (bilinear for the
    colours, nearest for the labels). Returns the Figure; its panels' arrays are what was drawn.
    """
    pca, labels = segment(trace, n_clusters, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads, seed=seed)
    size = image_size_of(trace, image)
    pca_up = torch.stack([_maps.upsample(pca[..., c], size) for c in range(3)], -1).clamp(0, 1)
    pca_rgb8 = as_rgb(pca_up.numpy())
    lab_up = torch.nn.functional.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    seg = blend(None if image is None else underlay(as_rgb(image)), label_colors(lab_up.numpy()), alpha)
    panels = ([(as_rgb(image), "image")] if image is not None else []) + [
        (pca_rgb8, "self-attention: 3 principal components"),
        (seg, f"k-means, {n_clusters} clusters"),
    ]
    fig = new_figure(figsize=(2.8 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (rgb, title) in zip(axes, panels):
        show_rgb(ax, rgb, title)
    h, w = labels.shape
    fig.suptitle(f"segmenting by self-attention rows · {h}×{w} grid · {layers_label(trace, layers or h, 'self')}", fontsize=10)
    return fig


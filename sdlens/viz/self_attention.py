"""Self-attention views: where one pixel attends, and a segmentation of the image from all pixels' rows.

Self-attention is ``(h·w) × (h·w)`` per layer: row ``q`` says which pixels the pixel ``q`` reads
from. Pixels of one object read from the same places, so their rows are alike: the principal
components of the rows, shown as colours, and k-means clusters of the rows both outline objects
without any text.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from .. import maps as _maps
from ..errors import CaptureError
from ._figure import draw_frame, figure_and_ax, new_figure, show_rgb
from .frames import as_rgb, blend, image_size_of, layers_label, map_sizes, self_frame
from .style import HEAT_CMAP, underlay


def self_attention_map(
    trace,
    pixel: tuple[int, int],
    image=None,
    *,
    prompt: int = 0,
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
        trace, pixel, image, prompt=prompt, steps=steps, layers=layers, heads=heads,
        alpha=alpha, cmap=cmap, scale=scale, marker=marker,
    )
    draw_frame(ax, frame, f"self-attention of {frame.label}\n{layers_label(trace, layers, 'self')}", bar=colorbar)
    return fig


# ---------------------------------------------------------------------------------------- the rows
def self_attention_rows(
    trace, *, prompt: int = 0, image: int = 0, steps=None, layers=None, heads=None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The self-attention matrix ``(h·w, h·w)`` float32, averaged over steps, heads and the chosen layers.

    The layers must share one map size (default: the layers of the largest size). Returns the
    matrix and its grid ``(h, w)``; row ``i`` is where pixel ``i`` (raster order) attends.
    """
    names = trace.layers_of("self")
    sizes = {n: trace.map_size(n) for n in names}
    if layers is None:
        layers = map_sizes(trace, "self")[0]
    chosen = trace.layer_names(layers, "self")
    grids = {sizes[n] for n in chosen}
    if len(grids) > 1:
        raise CaptureError(
            f"the chosen layers have different map sizes {sorted(grids)}: pick layers of one size, "
            f"e.g. layers={max(max(g) for g in grids)}"
        )
    total = None
    for n in chosen:  # each (h·w, h·w), averaged over steps and heads by the trace
        a = trace.self_matrix(n, prompt=prompt, image=image, steps=steps, heads=heads).cpu()
        total = a if total is None else total + a
    return total / len(chosen), next(iter(grids))


def pca_rgb(rows: torch.Tensor, grid: tuple[int, int], n_components: int = 3, seed: int = 0) -> torch.Tensor:
    """The first ``n_components`` (≤ 3) principal components of ``rows`` as an RGB image ``(h, w, 3)`` in 0..1.

    Component k is channel k, min–max normalised; signs are fixed so that each component's largest
    loading is positive (the picture does not flip between runs).
    """
    if not 1 <= n_components <= 3:
        raise CaptureError(f"n_components must be 1, 2 or 3 (one per colour channel); got {n_components}")
    x = rows.detach().float().cpu()
    x = x - x.mean(0, keepdim=True)
    q = min(n_components + 4, *x.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(x, q=q, niter=6)
    v = v[:, :n_components]  # (features, k)
    signs = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    proj = x @ (v * signs)  # (n, k)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    rgb = torch.zeros(x.shape[0], 3)
    rgb[:, :n_components] = proj
    return rearrange(rgb, "(h w) c -> h w c", h=grid[0], w=grid[1])


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Labels ``(n,)`` of k-means (k-means++ start, Lloyd iterations) on the rows of ``x (n, d)``.

    Deterministic for a ``seed``; clusters are numbered in the order their first member appears.
    """
    x = x.detach().float().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise CaptureError(f"n_clusters must be in 1..{n} (the number of pixels); got {k}")
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g).item()]]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ squared distance
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        if float(d2.sum()) <= 0:
            centers.append(x[torch.randint(n, (1,), generator=g).item()])
        else:
            centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g).item()])
    c = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    order = {}
    for lab in labels.tolist():  # renumber by first appearance in raster order
        order.setdefault(lab, len(order))
    return torch.tensor([order[lab] for lab in labels.tolist()])


def segment(trace, n_clusters: int = 4, *, prompt: int = 0, steps=None, layers=None, heads=None, seed: int = 0):
    """``(pca (h, w, 3) in 0..1, labels (h, w) int)`` from the self-attention rows (see ``self_attention_rows``)."""
    rows, grid = self_attention_rows(trace, prompt=prompt, steps=steps, layers=layers, heads=heads)
    pca = pca_rgb(rows, grid, seed=seed)
    labels = rearrange(kmeans(rows, n_clusters, seed=seed), "(h w) -> h w", h=grid[0], w=grid[1])
    return pca, labels


def label_colors(labels: np.ndarray, cmap: str = "tab10") -> np.ndarray:
    """``uint8 (H, W, 3)``: a distinct colour per cluster label."""
    from matplotlib import colormaps

    table = np.round(np.asarray(colormaps[cmap].colors)[:, :3] * 255).astype(np.uint8)  # a listed colour map
    return table[np.asarray(labels) % len(table)]


def self_attention_segments(
    trace,
    image=None,
    n_clusters: int = 4,
    *,
    prompt: int = 0,
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
    pca, labels = segment(trace, n_clusters, prompt=prompt, steps=steps, layers=layers, heads=heads, seed=seed)
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


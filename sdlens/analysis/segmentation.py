"""A segmentation of the image from its self-attention, with no text.

Self-attention is ``(h·w) × (h·w)`` per layer: row ``q`` says which pixels the pixel ``q`` reads
from. Pixels of one object read from the same places, so their rows are alike: the principal
components of the rows, shown as colours, and k-means clusters of the rows both outline objects.
``sdlens.viz.self_attention_segments`` draws them.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..errors import CaptureError
from ..maps import normalize
from ..vocabulary import renamed


@renamed(prompt="prompt_index", image="image_index")
def self_attention_rows(
    trace, *, prompt_index: int = 0, image_index: int = 0, steps=None, layers=None, heads=None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The self-attention matrix ``(h·w, h·w)`` float32, averaged over steps, heads and the chosen layers.

    The layers must share one map size (default: the layers of the largest size). Returns the
    matrix and its grid ``(h, w)``; row ``i`` is where pixel ``i`` (raster order) attends.
    """
    names = trace.layers_of("self")
    sizes = {n: trace.map_size(n) for n in names}
    if layers is None:  # the largest self-attention maps
        layers = max(max(size) for size in sizes.values())
    chosen = trace.layer_names(layers, "self")
    grids = {sizes[n] for n in chosen}
    if len(grids) > 1:
        raise CaptureError(
            f"the chosen layers have different map sizes {sorted(grids)}: pick layers of one size, "
            f"e.g. layers={max(max(g) for g in grids)}"
        )
    total = None
    for n in chosen:  # each (h·w, h·w), averaged over steps and heads by the trace
        a = trace.self_matrix(n, prompt_index=prompt_index, image_index=image_index, steps=steps, heads=heads).cpu()
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
    proj = torch.stack([normalize(c) for c in proj.T], 1)  # each component min-max normalised
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


@renamed(prompt="prompt_index")
def segment(trace, n_clusters: int = 4, *, prompt_index: int = 0, steps=None, layers=None, heads=None, seed: int = 0):
    """``(pca (h, w, 3) in 0..1, labels (h, w) int)`` from the self-attention rows (see ``self_attention_rows``)."""
    rows, grid = self_attention_rows(trace, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads)
    pca = pca_rgb(rows, grid, seed=seed)
    labels = rearrange(kmeans(rows, n_clusters, seed=seed), "(h w) -> h w", h=grid[0], w=grid[1])
    return pca, labels


__all__ = ["kmeans", "pca_rgb", "segment", "self_attention_rows"]

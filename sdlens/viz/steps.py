"""Over the denoising steps: how a word's map forms, and the image being denoised."""

from __future__ import annotations

import numpy as np

from ..vocabulary import renamed
from ._figure import colorbar, draw_frame, figure_and_ax, new_figure, show_rgb
from .frames import (
    attention_share,
    color_range,
    denoising_frame,
    has_previews,
    heat_frame,
    image_size_of,
    resolve_target,
    step_label,
    step_position,
    target_map,
)
from .style import HEAT_CMAP


def pick_steps(trace, steps=None, max_steps: int = 8) -> list[int]:
    """Step indices to show: ``steps`` as given, or up to ``max_steps`` captured steps evenly spread, last included."""
    if steps is not None:
        out = [trace.steps[step_position(trace, s)] for s in ([steps] if isinstance(steps, int) else steps)]
        return out
    n = len(trace.steps)
    if n <= max_steps:
        return list(trace.steps)
    idx = np.unique(np.round(np.linspace(0, n - 1, max_steps)).astype(int))
    return [trace.steps[i] for i in idx]


@renamed(prompt="prompt_index")
def step_strip(
    trace,
    word,
    image=None,
    *,
    steps=None,
    max_steps: int = 8,
    prompt_index: int = 0,
    layers=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    previews: bool = True,
):
    """The map of ``word`` at each of ``steps`` (default: up to ``max_steps`` spread over the run).

    Each panel's title is the step, its timestep and (when recorded) the noise level. With
    ``previews`` and a trace recorded with ``record_latents=True``, a second row shows the predicted
    clean image x0 at the same steps. ``scale="shared"`` (default) puts the steps on one colour
    scale, so the map is seen to sharpen and strengthen; ``"each"`` rescales every panel (shapes only).
    """
    shown = pick_steps(trace, steps, max_steps)
    t = resolve_target(trace, word, prompt_index)
    size = image_size_of(trace, image)
    heats = [
        target_map(trace, t, prompt_index=prompt_index, steps=[s], layers=layers, heads=heads, size=size) for s in shown
    ]
    ranges = [None] * len(heats) if scale == "each" else color_range(heats, scale)
    with_previews = previews and has_previews(trace)
    nrows = 2 if with_previews else 1
    fig = new_figure(figsize=(2.2 * len(shown) + 0.6, 2.4 * nrows + 0.3))
    axes = fig.subplots(nrows, len(shown), squeeze=False)
    frames = []
    for j, (s, h, r) in enumerate(zip(shown, heats, ranges)):
        frames.append(heat_frame(h, image, t.label, alpha=alpha, cmap=cmap, vrange=r))
        draw_frame(axes[0, j], frames[-1], step_label(trace, s).replace(" · ", "\n", 1), bar=False)
        if with_previews:
            d = denoising_frame(trace, s, prompt_index=prompt_index)
            pic = d.x0 if d.x0 is not None else d.xt
            show_rgb(axes[1, j], pic, "predicted x0" if d.x0 is not None else "x_t")
    if scale != "each":
        colorbar(fig, frames[0], axes[0, :].tolist(), "attention (one scale)")
    fig.suptitle(f"{t.label!r} over the denoising steps" + (" · colours per panel" if scale == "each" else ""),
                 fontsize=10)
    return fig


@renamed(prompt="prompt_index", image="image_index")
def denoising(trace, step: int = -1, *, prompt_index: int = 0, image_index: int = 0, ax=None):
    """The image being denoised at ``step``: x_t (decoded), predicted x0, and the noise level over the run.

    Needs a trace recorded with ``sdlens.trace(pipe, record_latents=True)``. With ``ax`` (a sequence
    of 3 axes) it draws there. What ``DenoisingExplorer`` shows.
    """
    d = denoising_frame(trace, step, prompt_index=prompt_index, image_index=image_index)
    if ax is None:
        fig = new_figure(figsize=(8.4, 2.9))
        axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.2])
    else:
        axes = list(ax)
        fig = axes[0].figure
    blank = np.full_like(d.x0 if d.x0 is not None else d.xt, 255)
    show_rgb(axes[0], d.xt if d.xt is not None else blank, "x_t (noisy latent, decoded)")
    show_rgb(axes[1], d.x0 if d.x0 is not None else blank, "predicted clean image x0")
    levels = getattr(trace, "noise_levels", None)
    if levels is not None and len(levels) == len(trace.steps):
        axes[2].plot(trace.steps, [float(v) for v in levels], "-", color="0.4")
        axes[2].plot([d.step], [d.noise], "o", color="crimson")
        axes[2].set_xlabel("step", fontsize=8)
        axes[2].set_ylabel("noise level (1: pure noise)", fontsize=8)
        axes[2].tick_params(labelsize=7)
    else:
        axes[2].set_axis_off()
    axes[2].set_title(step_label(trace, d.step), fontsize=9)
    return fig


@renamed(prompt="prompt_index")
def word_over_steps(trace, word, *, ax=None, prompt_index: int = 0, layers=None, heads=None):
    """A line plot: the share of attention of ``word`` (its map's mean) at each captured step."""
    fig, ax = figure_and_ax(ax, figsize=(4, 2.6))
    t = resolve_target(trace, word, prompt_index)
    shares = [attention_share(trace, t, prompt_index=prompt_index, steps=[s], layers=layers, heads=heads) for s in trace.steps]
    ax.plot(trace.steps, shares, "o-", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, max(shares) * 1.1)  # from zero: a small change must not look like a big one
    ax.set_title(f"{t.label!r}: share of the attention mass per step", fontsize=9)
    return fig

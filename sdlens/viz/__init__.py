"""Figures of a trace (matplotlib) and a GIF over the denoising steps.

Every function returns a matplotlib Figure (Jupyter shows it; ``fig.savefig(path)`` writes it);
functions that draw one panel accept ``ax=`` to draw into an existing axes.

    import sdlens, sdlens.viz as viz
    with sdlens.trace(pipe, self_attn=True, record_latents=True) as tr:
        image = pipe("a red circle on the left").images[0]
    viz.overlay(tr, "circle", image)            # one word over the image, colour bar, title
    viz.word_grid(tr, image)                    # every word, and the start/end/padding slots
    viz.concept_grid(tr, image)                 # SD 3: trace(pipe, concepts=[...]) maps
    viz.direction_grid(tr, image)               # SD 3: trace(pipe, text_attn=True): word maps both ways
    viz.step_strip(tr, "circle", image)         # the map over the denoising steps
    viz.layer_grid(tr, "circle", image, by="size")
    viz.self_attention_map(tr, (20, 12), image) # where one pixel attends
    viz.self_attention_segments(tr, image, n_clusters=3)
    viz.animate(tr, ["circle", "left"], "circle.gif")

The pixels come from ``sdlens.viz.frames``, shared with the ``sdlens.widgets`` explorers; the
conventions (colour map, numbers on cells, mask outlines) from ``sdlens.viz.style``.
"""

from ..analysis import kmeans, pca_rgb, segment, self_attention_rows  # the measures these figures draw
from .animation import animate, animation_frames
from .architecture import architecture, plan
from .frames import (
    SPECIALS,
    Frame,
    Target,
    as_rgb,
    attention_share,
    attention_shares,
    denoising_frame,
    overlay_frame,
    resolve_target,
    self_frame,
    target_map,
)
from .heatmaps import concept_grid, direction_grid, head_grid, layer_grid, overlay, word_grid
from .self_attention import self_attention_map, self_attention_segments
from .steps import denoising, step_strip, word_over_steps
from .style import HEAT_CMAP, annotate_cells, framed_mask, outline, overlap, text_color

__all__ = [
    "architecture",
    "plan",
    "HEAT_CMAP",
    "SPECIALS",
    "Frame",
    "Target",
    "animate",
    "animation_frames",
    "annotate_cells",
    "as_rgb",
    "attention_share",
    "attention_shares",
    "denoising",
    "denoising_frame",
    "framed_mask",
    "concept_grid",
    "direction_grid",
    "head_grid",
    "kmeans",
    "layer_grid",
    "outline",
    "overlap",
    "overlay",
    "overlay_frame",
    "pca_rgb",
    "resolve_target",
    "segment",
    "self_attention_map",
    "self_attention_rows",
    "self_attention_segments",
    "self_frame",
    "step_strip",
    "target_map",
    "text_color",
    "word_grid",
    "word_over_steps",
]

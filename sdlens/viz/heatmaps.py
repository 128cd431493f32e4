"""Cross-attention heat maps on the image: one word, all words, per layer or map size, per head."""

from __future__ import annotations

from ..errors import CaptureError
from ..vocabulary import renamed
from ._figure import colorbar, draw_frame, figure_and_ax, panel_grid, show_rgb, wrap
from .frames import (
    DIRECTION_TITLES,
    as_rgb,
    attention_shares,
    color_range,
    format_share,
    heads_in,
    heat_frame,
    image_size_of,
    layers_label,
    map_sizes,
    overlay_frame,
    prompt_targets,
    resolve_target,
    short_layer_name,
    size_label,
    target_map,
)
from .style import HEAT_CMAP


def scale_note(scale) -> str:
    """A few words for a suptitle saying how the panels are coloured."""
    if scale == "each":
        return ""
    if scale == "shared":
        return " · one colour scale"
    if scale == "absolute":
        return " · one colour scale from 0"
    return " · fixed colour scale"


@renamed(prompt="prompt_index")
def overlay(
    trace,
    word,
    image=None,
    *,
    prompt_index: int = 0,
    steps=None,
    layers=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="each",
    title: str | None = None,
    colorbar: bool = True,
    direction: str = "image_text",
    ax=None,
):
    """The map of ``word`` over ``image`` (its cross-attention by default), with a colour bar and the word as title.

    ``word``: a word, a word index, ``"<start>"``, ``"<end>"``, ``"<pad>"`` or ``("slot", i)``.
    ``steps``, ``layers``, ``heads``, ``direction``: as ``AttentionTrace.word_map`` (default: the
    pixels' attention, averaged over all steps, layers and heads).
    ``scale``: ``"each"`` (colours span the map's min..max) or a number / pair of bounds.
    The colour bar shows attention probabilities. Returns the Figure.

    Example::

        fig = sdlens.viz.overlay(tr, "circle", image)
        fig.savefig("circle.png")
    """
    fig, ax = figure_and_ax(ax)
    frame = overlay_frame(
        trace, word, image, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads, alpha=alpha, cmap=cmap,
        scale=scale, direction=direction,
    )
    draw_frame(ax, frame, title if title is not None else frame.label, bar=colorbar)
    return fig


@renamed(prompt="prompt_index")
def word_grid(
    trace,
    image=None,
    *,
    prompt_index: int = 0,
    words=None,
    specials: bool = True,
    steps=None,
    layers=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    ncols: int | None = None,
):
    """The image, then one overlay per word of the prompt, then (``specials``) its start, end and padding slots.

    Every panel's title gives the share of the attention mass its slots take (the padding slots
    are summed). The words are compared, so by default (``scale="shared"``) their panels share one
    colour scale (one min..max) and one colour bar: a faint word looks faint; the start, end and
    padding panels, which are not words (the padding's map is the sum of its slots), keep their own
    scale and bar. ``scale="absolute"`` puts every panel on 0..the largest value, specials included;
    ``scale="each"`` gives each panel its own min..max and colour bar (each map's shape, its strength
    hidden). Maps are drawn over the picture's grey (``style.underlay``).
    """
    targets = prompt_targets(trace, prompt_index, words=words, specials=specials)
    size = image_size_of(trace, image)
    sel = dict(prompt_index=prompt_index, steps=steps, layers=layers, heads=heads)
    heats = [target_map(trace, t, size=size, **sel) for t in targets]
    # "shared": the words share one scale; the start, end and padding slots (the padding summed over
    # its slots) are not words and keep their own, or they would set the words' scale
    own = [scale == "each" or (scale == "shared" and t.kind in ("start", "end", "pad")) for t in targets]
    shared = [h for h, o in zip(heats, own) if not o]
    common = iter(color_range(shared, scale)) if shared else iter(())
    ranges = [None if o else next(common) for o in own]
    frames = [heat_frame(h, image, t.label, alpha=alpha, cmap=cmap, vrange=r) for h, t, r in zip(heats, targets, ranges)]
    first = 1 if image is not None else 0
    fig, axes = panel_grid(len(frames) + first, ncols, extra_width=0.6 if scale != "each" else 0.0)
    if image is not None:
        show_rgb(axes[0], as_rgb(image), wrap(trace.prompts[prompt_index], 28) if trace.prompts else "image")
    shares = attention_shares(trace, targets, **sel)
    for ax, frame, t, share, o in zip(axes[first:], frames, targets, shares, own):
        draw_frame(ax, frame, f"{t.label}\n{format_share(share)} of attention", bar=o, bar_label=None)
    one = [(ax, f) for ax, f, o in zip(axes[first:], frames, own) if not o]
    if one:
        colorbar(fig, one[0][1], [ax for ax, _ in one], "words: one scale" if scale == "shared" else "one scale")
    what = layers_label(trace, layers)
    fig.suptitle(f"cross-attention per word · {what}{scale_note(scale)}", fontsize=10)
    return fig


@renamed(prompt="prompt_index")
def concept_grid(trace, image=None, *, concepts=None, prompt_index: int = 0, steps=None, layers=None,
                 space: str = "output", alpha: float = 0.6, cmap: str = HEAT_CMAP, ncols: int | None = None):
    """The image, then one concept map per concept (``trace(pipe, concepts=[...])``, SD 3).

    ``space="output"`` (ConceptAttention's): each map is a softmax over the traced concepts at every
    pixel, so all panels share one colour scale from 0 to 1: at each pixel the concepts' values add
    up to 1. ``space="attention"``: where each concept token looks, its attention probability on each
    pixel; the panels share one scale from 0 to the largest value, so a concept that looks less at
    the image looks fainter.
    """
    names = list(trace.concepts or []) if concepts is None else list(concepts)
    if not names:
        raise CaptureError("this trace has no concept maps: trace with concepts=['circle', 'square', ...]")
    size = image_size_of(trace, image)
    heats = [trace.concept_map(c, prompt_index=prompt_index, steps=steps, layers=layers, space=space, size=size)
             for c in names]
    vrange = (0.0, 1.0) if space == "output" else (0.0, max(float(h.max()) for h in heats))
    frames = [heat_frame(h, image, c, alpha=alpha, cmap=cmap, vrange=vrange) for h, c in zip(heats, names)]
    first = 1 if image is not None else 0
    fig, axes = panel_grid(len(frames) + first, ncols, extra_width=0.6)
    if image is not None:
        show_rgb(axes[0], as_rgb(image), wrap(trace.prompts[prompt_index], 28) if trace.prompts else "image")
    for ax, frame, c in zip(axes[first:], frames, names):
        draw_frame(ax, frame, c, bar=False)
    kind = "concept" if space == "output" else "concept_image"
    if space == "output":
        colorbar(fig, frames[0], axes[first:], "share of the concepts (one scale)")
        title = "concept maps (ConceptAttention, output space)"
    else:
        colorbar(fig, frames[0], axes[first:], "the concept's attention (one scale)")
        title = "concept maps (where each concept token looks)"
    fig.suptitle(f"{title} · {layers_label(trace, layers, kind=kind)}", fontsize=10)
    return fig


@renamed(prompt="prompt_index")
def direction_grid(trace, image=None, *, words=None, prompt_index: int = 0, steps=None, layers=None,
                   alpha: float = 0.6, cmap: str = HEAT_CMAP):
    """Word maps read both ways through joint attention (``trace(pipe, text_attn=True)``, SD 3): one
    row per word (default: every word of the prompt), with its ``word_map`` in each ``direction``:
    how much each pixel attends to the word, where the word's tokens attend in the image, and where
    the two agree. The three are on different scales (a share of each pixel's attention, a share of
    the word's, a product of two min-max normalised maps), so each panel spans its own min..max.
    """
    items = list(range(len(trace.words(prompt_index)))) if words is None else list(words)
    if not items:
        raise CaptureError("no words to draw")
    size = image_size_of(trace, image)
    sel = dict(prompt_index=prompt_index, steps=steps, layers=layers, size=size)
    labels = [resolve_target(trace, w, prompt_index).label for w in items]
    first = 1 if image is not None else 0
    fig, axes = panel_grid(len(items) * (len(DIRECTION_TITLES) + first), len(DIRECTION_TITLES) + first)
    per_row = len(DIRECTION_TITLES) + first
    for r, (w, label) in enumerate(zip(items, labels)):
        row = axes[r * per_row : (r + 1) * per_row]
        if image is not None:
            show_rgb(row[0], as_rgb(image), label)
        for ax, (direction, title) in zip(row[first:], DIRECTION_TITLES.items()):
            heat = trace.word_map(w, direction=direction, **sel)
            draw_frame(ax, heat_frame(heat, image, label, alpha=alpha, cmap=cmap), f"{label}: {title}", bar=False)
    fig.suptitle(f"word maps both ways (each panel its own min..max) · {layers_label(trace, layers)}", fontsize=10)
    return fig


def _heat_panels(heats, labels, image=None, *, alpha: float = 0.6, cmap: str = HEAT_CMAP, scale="shared",
                ncols: int | None = None):
    """One panel per map of ``heats``, titled by ``labels``, over ``image``: with ``scale="each"`` each
    panel has its own colour range and bar, else they share ``color_range(heats, scale)`` and one bar."""
    ranges = [None] * len(heats) if scale == "each" else color_range(heats, scale)
    fig, axes = panel_grid(len(heats), ncols, extra_width=0.6 if scale != "each" else 0.0)
    frames = [heat_frame(h, image, label, alpha=alpha, cmap=cmap, vrange=r) for h, label, r in zip(heats, labels, ranges)]
    for ax, frame in zip(axes, frames):
        draw_frame(ax, frame, frame.label, bar=scale == "each", bar_label=None)
    if scale != "each":
        colorbar(fig, frames[0], axes, "attention (one scale)")
    return fig


@renamed(prompt="prompt_index")
def layer_grid(
    trace,
    word,
    image=None,
    *,
    by: str = "layer",
    prompt_index: int = 0,
    steps=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    ncols: int | None = None,
):
    """The map of ``word`` in each cross-attention layer (``by="layer"``) or each map size (``by="size"``).

    Shows where in the network a word's map is sharp: low-resolution layers give blobs, high
    resolution layers give outlines. Titles name the layer (``down1.0 · 16×16``) or the size. The
    panels share one colour scale by default (``scale="each"``: each its own, shapes only).
    """
    if by == "layer":
        selections = [(name, f"{short_layer_name(name)} · {size_label(trace.map_size(name))}") for name in trace.layers_of("cross")]
    elif by == "size":
        selections = [(s, layers_label(trace, s)) for s in map_sizes(trace)]
    else:
        raise CaptureError(f"by={by!r}: use 'layer' or 'size'")
    t = resolve_target(trace, word, prompt_index)
    size = image_size_of(trace, image)
    heats = [target_map(trace, t, prompt_index=prompt_index, steps=steps, layers=sel, heads=heads, size=size) for sel, _ in selections]
    fig = _heat_panels(heats, [label for _, label in selections], image, alpha=alpha, cmap=cmap, scale=scale, ncols=ncols)
    fig.suptitle(f"{t.label!r} per {'layer' if by == 'layer' else 'map size'}{scale_note(scale)}", fontsize=10)
    return fig


@renamed(prompt="prompt_index")
def head_grid(
    trace,
    word,
    layer,
    image=None,
    *,
    prompt_index: int = 0,
    steps=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    ncols: int | None = None,
):
    """The map of ``word`` in each kept head of ``layer`` (a layer name, or an int map size), after their mean.
    The panels share one colour scale by default (``scale="each"``: each its own, shapes only).

    Needs a trace captured with ``heads="all"`` (or a list of heads). Pass one layer's name to see
    what its heads do: with a map size, "head 1" is the mean of head 1 of every layer of that size,
    and heads of different layers share nothing but their number (the panels then say so).
    """
    if trace.head_indices is None:
        raise CaptureError("heads were averaged during capture: trace with sdlens.trace(pipe, heads='all') to see heads")
    heads = heads_in(trace, layer)
    if not heads:
        raise CaptureError(f"no head is kept in every layer of {layers_label(trace, layer)}")
    t = resolve_target(trace, word, prompt_index)
    size = image_size_of(trace, image)
    n_layers = len(trace.layer_names(layer))
    across = f" (mean over {n_layers} layers)" if n_layers > 1 else ""
    sels = [(None, "mean of heads")] + [(h, f"head {h}{across}") for h in heads]
    heats = [target_map(trace, t, prompt_index=prompt_index, steps=steps, layers=layer, heads=h, size=size) for h, _ in sels]
    fig = _heat_panels(heats, [label for _, label in sels], image, alpha=alpha, cmap=cmap, scale=scale, ncols=ncols)
    fig.suptitle(f"{t.label!r} per head · {layers_label(trace, layer)}{scale_note(scale)}", fontsize=10)
    return fig

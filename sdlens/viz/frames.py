"""Pictures as arrays: the one place where a map from the trace becomes coloured pixels.

Every figure in ``sdlens.viz`` and every explorer in ``sdlens.widgets`` draws what these functions
return, so a figure and an explorer set the same way show exactly the same pixels.

- ``as_rgb``: any image (PIL, numpy, torch) → ``uint8 (H, W, 3)``.
- ``resolve_target``: a word, a word index, ``"<start>"``/``"<end>"``/``"<pad>"`` or ``("slot", i)``
  → the key slots it stands for.
- ``colorize`` / ``blend``: a map → colours → on top of the image.
- ``overlay_frame``, ``self_frame``, ``denoising_frame``: the frames the figures and explorers draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import maps as _maps
from ..analysis.shares import slot_shares
from ..errors import CaptureError
from ..select import check_step
from ..vocabulary import renamed
from .style import HEAT_CMAP, underlay

SPECIALS = ("<start>", "<end>", "<pad>")
"""Names of the key slots that are not words: CLIP's start token, end token and the padding after it."""


# ---------------------------------------------------------------------------------------- images
def as_rgb(image) -> np.ndarray:
    """``image`` as ``uint8 (H, W, 3)``.

    Takes a PIL image, a numpy array or a torch tensor: ``(H, W)``, ``(H, W, 3|4)`` or ``(3, H, W)``;
    integers are taken as 0..255, floats as 0..1.
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()
        image = image.numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise CaptureError(f"an image must be (H, W), (H, W, 3|4) or (3, H, W); got shape {tuple(np.shape(image))}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0)
    return np.clip(a, 0, 255).astype(np.uint8)


def image_size_of(trace, image) -> tuple[int, int]:
    """``(H, W)`` the maps are drawn at: the image's size if there is one, else the trace's."""
    if image is not None:
        return tuple(as_rgb(image).shape[:2])
    if trace.image_size is None:
        raise CaptureError("the trace does not know its image size: pass the image")
    return tuple(trace.image_size)


def upscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer ``factor`` (every pixel becomes a factor×factor block)."""
    if factor <= 1:
        return rgb
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


# the names the figures and the explorer give word_map's directions
DIRECTION_TITLES = {"image_text": "pixels → word", "text_image": "word → pixels", "both": "both agree"}


# ---------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """What a cross-attention map is of: a label, the key slots, and how their maps combine.

    ``reduce`` is ``"mean"`` for a word (the mean of its BPE tokens' maps, as ``word_map``) and
    ``"sum"`` for the padding slots (where all of them together send the attention).
    """

    label: str
    slots: tuple[int, ...]
    kind: str  # "word", "token", "start", "end" or "pad"
    reduce: str = "mean"
    word_index: int | None = None  # a word's index in the prompt's words (kind "word")


@renamed(prompt="prompt_index")
def resolve_target(trace, target, prompt_index: int = 0) -> Target:
    """The key slots of ``target`` in prompt ``prompt_index``.

    ``target`` is a word of the prompt (``"circle"``), its index in ``trace.words(prompt_index)``, one of
    ``"<start>"``, ``"<end>"``, ``"<pad>"`` (all padding slots, summed), ``("slot", i)`` for one
    token slot, or a ``Target``.
    """
    if isinstance(target, Target):
        return target
    tok = trace.tokenization(prompt_index)
    if isinstance(target, tuple) and len(target) == 2 and target[0] == "slot":
        i = int(target[1])
        labels = trace.tokens(prompt_index)
        if not 0 <= i < len(labels):
            raise CaptureError(f"slot {i} is out of range: prompt {prompt_index} has slots 0..{len(labels) - 1}")
        return Target(f"#{i} {labels[i]}", (i,), "token")
    if isinstance(target, str) and target in SPECIALS:
        kind = target[1:-1]
        slots = tuple(i for i, k in enumerate(tok.kinds) if k == kind)
        if not slots:
            raise CaptureError(f"prompt {prompt_index} has no {target} slot (the prompt fills every slot)")
        if kind == "pad":
            return Target(f"<pad> ×{len(slots)}", slots, kind, reduce="sum")
        return Target(target, slots, kind)
    if isinstance(target, bool) or not isinstance(target, (str, int, np.integer)):
        raise CaptureError(
            f"a target is a word, a word index, one of {', '.join(SPECIALS)} or ('slot', i); got {target!r}"
        )
    wi = trace.word_index(target, prompt_index)  # the trace resolves words: CaptureError naming the prompt's words
    return Target(tok.words[wi], tuple(tok.word_tokens[wi]), "word", word_index=wi)


def prompt_targets(trace, prompt_index: int = 0, *, words=None, specials: bool = True) -> list[Target]:
    """The words of the prompt (or ``words``), then, with ``specials``, its start, end and padding slots."""
    items = list(range(len(trace.words(prompt_index)))) if words is None else list(words)
    out = [resolve_target(trace, w, prompt_index) for w in items]
    if specials:
        kinds = trace.tokenization(prompt_index).kinds
        out += [resolve_target(trace, s, prompt_index) for s in SPECIALS if s[1:-1] in kinds]
    return out


@renamed(prompt="prompt_index")
def target_map(trace, target, *, prompt_index: int = 0, steps=None, layers=None, heads=None, size=None,
               direction: str = "image_text") -> torch.Tensor:
    """Map ``(H, W)`` of ``target``: its cross-attention, ``trace.slot_map`` of its slots (summed for
    padding); for a word with ``direction="text_image"`` or ``"both"`` (joint attention, traced with
    ``text_attn=True``), ``trace.word_map`` read that way."""
    t = resolve_target(trace, target, prompt_index)
    if direction != "image_text":
        if t.word_index is None:
            raise CaptureError(f"direction={direction!r} reads a word's own tokens; {t.label!r} is not a word "
                               "of the prompt (use direction='image_text')")
        return trace.word_map(t.word_index, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads,
                              size=size, direction=direction)
    m = trace.slot_map(list(t.slots), prompt_index=prompt_index, steps=steps, layers=layers, heads=heads, size=size)
    return m * len(t.slots) if t.reduce == "sum" else m


@renamed(prompt="prompt_index")
def attention_shares(trace, targets, *, prompt_index: int = 0, steps=None, layers=None, heads=None) -> list[float]:
    """Share (0..1) of the cross-attention mass that goes to each target's slots.

    Each query pixel spreads its attention over the key slots; a target's share is its slots' sum
    over all slots' sum, averaged over the pixels (``sdlens.analysis.slot_shares`` of its slots).
    """
    slots = [resolve_target(trace, t, prompt_index).slots for t in targets]
    return slot_shares(trace, slots, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads)


def format_share(share: float) -> str:
    """A share as a percentage; small shares keep a decimal.

    >>> format_share(0.9), format_share(0.0132)
    ('90%', '1.3%')
    """
    return f"{share:.0%}" if share >= 0.095 else f"{share:.1%}"


def attention_share(trace, target, **kw) -> float:
    """Share (0..1) of the cross-attention mass that goes to ``target``'s slots (see ``attention_shares``)."""
    return attention_shares(trace, [target], **kw)[0]


# ---------------------------------------------------------------------------------------- colours
def colorize(heat, vmin: float, vmax: float, cmap: str = HEAT_CMAP) -> np.ndarray:
    """``heat (H, W)`` → ``uint8 (H, W, 3)`` through matplotlib's colour map ``cmap`` between vmin and vmax."""
    from matplotlib import colormaps

    h = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    v = np.clip((h - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return colormaps[cmap](v, bytes=True)[..., :3]


def blend(image: np.ndarray | None, colors: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha``·colours + (1 − alpha)·image, as uint8; with no image, the colours alone."""
    if image is None:
        return colors
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.round(out).astype(np.uint8)


def color_range(heats: Sequence, scale="each") -> list[tuple[float, float]]:
    """``(vmin, vmax)`` of each map for a colour ``scale``.

    ``"each"``: each map's own min..max (the shape of each map; its strength hidden);
    ``"shared"``: one min..max over all maps (strengths comparable across maps);
    ``"absolute"``: 0..the largest value of all maps (comparable, and 0 is no attention at all);
    a number: 0..that; a pair: those bounds.
    """
    if isinstance(scale, str):
        if scale == "each":
            return [(float(h.min()), float(h.max())) for h in heats]
        if scale == "shared":
            lo, hi = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
            return [(lo, hi)] * len(heats)
        if scale == "absolute":
            return [(0.0, max(float(h.max()) for h in heats))] * len(heats)
        raise CaptureError(
            f"scale={scale!r}: use 'each', 'shared', 'absolute', a number (vmax) or a pair (vmin, vmax)"
        )
    if isinstance(scale, (int, float)):
        return [(0.0, float(scale))] * len(heats)
    lo, hi = scale
    return [(float(lo), float(hi))] * len(heats)


# ---------------------------------------------------------------------------------------- frames
@dataclass
class Frame:
    """One drawn map: ``rgb`` the pixels shown, ``heat`` the map's values, the colour range and a title."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    heat: np.ndarray  # float32 (H, W)
    vmin: float
    vmax: float
    label: str
    cmap: str = HEAT_CMAP


def heat_frame(heat, image, label: str, *, alpha: float = 0.6, cmap: str = HEAT_CMAP, vrange=None) -> Frame:
    """A ``Frame`` from a map already computed: coloured (``vrange`` or its own min..max) and blended on
    ``image``'s grey (``style.underlay``: no colour of the picture can pass for attention)."""
    h = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    if vrange is None:
        vmin, vmax = (float(h.min()), float(h.max()))
        h01 = _maps.normalize(torch.from_numpy(h)).numpy()  # min-max, as the trace's maps are normalised
        colors = colorize(h01, 0.0, 1.0, cmap)
    else:
        vmin, vmax = vrange
        colors = colorize(h, vmin, vmax, cmap)
    base = None if image is None else as_rgb(image)
    if base is not None and base.shape[:2] != h.shape:
        raise CaptureError(f"the map is {h.shape} but the image is {base.shape[:2]}")
    return Frame(blend(None if base is None else underlay(base), colors, alpha), h, vmin, vmax, label, cmap)


@renamed(prompt="prompt_index")
def overlay_frame(
    trace,
    target,
    image=None,
    *,
    prompt_index: int = 0,
    steps=None,
    layers=None,
    heads=None,
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="each",
    direction: str = "image_text",
) -> Frame:
    """The map of ``target`` over ``image``: what ``viz.overlay`` and ``AttentionExplorer`` show.

    ``steps``, ``layers``, ``heads`` select as in ``AttentionTrace.slot_map``; ``direction`` as in
    ``AttentionTrace.word_map`` (joint attention: the word's map read the other way, or both ways);
    the map is computed at the image's size (the trace's image size when ``image`` is None, then
    drawn without an image).
    """
    t = resolve_target(trace, target, prompt_index)
    size = image_size_of(trace, image)
    heat = target_map(trace, t, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads, size=size,
                      direction=direction)
    vrange = None if scale == "each" else color_range([heat], scale)[0]
    return heat_frame(heat, image, t.label, alpha=alpha, cmap=cmap, vrange=vrange)


def mark(rgb: np.ndarray, pixel: tuple[int, int], color=(255, 255, 255), radius: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with a cross (and a dark outline) drawn at ``pixel = (y, x)``."""
    out = rgb.copy()
    h, w = out.shape[:2]
    r = radius if radius is not None else max(2, min(h, w) // 16)
    y, x = int(pixel[0]), int(pixel[1])
    for dy, dx, c in ((0, 1, (0, 0, 0)), (1, 0, (0, 0, 0)), (0, 0, color)):  # outline first, then the cross
        ys, xs = slice(max(0, y - r), min(h, y + r + 1)), slice(max(0, x - r), min(w, x + r + 1))
        if 0 <= y + dy < h:
            out[y + dy, xs] = c
        if 0 <= x + dx < w:
            out[ys, x + dx] = c
    return out


@renamed(prompt="prompt_index")
def self_frame(
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
) -> Frame:
    """Where the image pixel ``(y, x)`` attends by self-attention, over ``image``, with the pixel marked.

    What ``viz.self_attention_map`` and ``SelfAttentionExplorer`` show. ``pixel`` is in the pixels
    of ``image`` (of the trace's image when ``image`` is None).
    """
    size = image_size_of(trace, image)
    y, x = int(pixel[0]), int(pixel[1])
    if not (0 <= y < size[0] and 0 <= x < size[1]):
        raise CaptureError(f"pixel {(y, x)} is outside the image of size {size}")
    ih, iw = trace.image_size or size
    query = (y * ih / size[0], x * iw / size[1])  # the pixel in the trace's image coordinates
    heat = trace.self_map(query, prompt_index=prompt_index, steps=steps, layers=layers, heads=heads, size=size)
    vrange = None if scale == "each" else color_range([heat], scale)[0]
    frame = heat_frame(heat, image, f"pixel (y={y}, x={x})", alpha=alpha, cmap=cmap, vrange=vrange)
    if marker:
        frame.rgb = mark(frame.rgb, (y, x))
    return frame


# ---------------------------------------------------------------------------------------- denoising
def has_previews(trace) -> bool:
    """True when the trace recorded the decoded x_t and x0 of every step (``record_latents=True``)."""
    return getattr(trace, "x0_images", None) is not None or getattr(trace, "xt_images", None) is not None


def _preview(trace, which: str, pos: int, row: int) -> np.ndarray | None:
    imgs = getattr(trace, f"{which}_images", None)
    if imgs is None:
        return None
    return as_rgb(imgs[pos][row])


@dataclass
class DenoisingFrame:
    """One step of the denoising: the decoded noisy latent x_t, the predicted clean image x0, the noise level."""

    step: int
    timestep: float
    noise: float | None
    xt: np.ndarray | None  # uint8 (H, W, 3)
    x0: np.ndarray | None  # uint8 (H, W, 3)


def side_by_side(pictures: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """``uint8`` pictures of one height side by side, with ``gap`` white columns between them."""
    h = pictures[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    out = [pictures[0]]
    for p in pictures[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=1)


def step_position(trace, step: int) -> int:
    """Position in the trace's captured steps of step index ``step`` (negative counts from the end of
    the steps the run made, as everywhere: ``trace.step_positions``)."""
    return trace.step_positions([check_step(step)])[0]


@renamed(prompt="prompt_index", image="image_index")
def denoising_frame(trace, step: int, *, prompt_index: int = 0, image_index: int = 0) -> DenoisingFrame:
    """x_t and predicted x0 previews at captured step ``step`` (from a trace with ``record_latents=True``)."""
    if not has_previews(trace):
        raise CaptureError(
            "this trace has no denoising previews: trace with sdlens.trace(pipe, record_latents=True)"
        )
    pos = step_position(trace, step)
    row = trace.preview_row(prompt_index, image_index)
    levels = getattr(trace, "noise_levels", None)
    noise = float(levels[pos]) if levels is not None and len(levels) > pos else None
    return DenoisingFrame(
        step=trace.steps[pos],
        timestep=float(trace.timesteps[pos]),
        noise=noise,
        xt=_preview(trace, "xt", pos, row),
        x0=_preview(trace, "x0", pos, row),
    )


# ---------------------------------------------------------------------------------------- names
_UNET = re.compile(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn\d")
_MID = re.compile(r"mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn\d")
_DIT = re.compile(r"(?:joint_)?transformer_blocks\.(\d+)\.attn\d?$")


def short_layer_name(name: str) -> str:
    """A short label of a diffusers layer path.

    >>> short_layer_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    'down1.0'
    >>> short_layer_name("mid_block.attentions.0.transformer_blocks.0.attn1"), short_layer_name("transformer_blocks.3.attn")
    ('mid', 'block 3')
    """
    if m := _UNET.fullmatch(name):
        part, block, att, tb = m.groups()
        return f"{part}{block}.{att}" + (f".t{tb}" if tb != "0" else "")
    if m := _MID.fullmatch(name):
        att, tb = m.groups()
        return "mid" + (f".{att}" if att != "0" else "") + (f".t{tb}" if tb != "0" else "")
    if m := _DIT.fullmatch(name):
        return f"block {m.group(1)}"
    return name


def size_label(hw: tuple[int, int]) -> str:
    return f"{hw[0]}×{hw[1]}"


def map_sizes(trace, kind: str = "cross") -> list[int]:
    """The distinct map sides (largest first) of the ``kind`` layers, as the ``layers=`` int selector takes them."""
    return sorted({max(trace.map_size(n)) for n in trace.layers_of(kind)}, reverse=True)


def layers_label(trace, layers, kind: str = "cross") -> str:
    """A readable name of a ``layers=`` selection (None, an int size, a layer name)."""
    if layers is None:
        return "all layers"
    if isinstance(layers, int):
        n = sum(layers in trace.map_size(x) for x in trace.layers_of(kind))
        return f"{layers}×{layers} maps ({n} layer{'s' * (n != 1)})"
    if isinstance(layers, str) and layers in trace.layers:
        return f"{short_layer_name(layers)} ({size_label(trace.map_size(layers))})"
    return str(layers)


def heads_in(trace, layers, kind: str = "cross") -> list[int]:
    """Model head indices kept in every layer of the selection (empty when heads were averaged)."""
    if trace.head_indices is None:
        return []
    names = trace.layer_names(layers, kind)
    common = None
    for n in names:
        kept = trace.head_indices[n]
        common = list(kept) if common is None else [h for h in common if h in kept]
    return common or []


def step_label(trace, step: int) -> str:
    pos = step_position(trace, step)
    text = f"step {trace.steps[pos]} · t={trace.timesteps[pos]:.0f}"
    levels = getattr(trace, "noise_levels", None)
    if levels is not None and len(levels) > pos:
        text += f" · noise {float(levels[pos]):.2f}"
    return text

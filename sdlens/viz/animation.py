"""A GIF over the denoising steps: the image being denoised beside the words' attention maps.

Frames are composed with numpy and Pillow (no matplotlib per frame), and the file is written
atomically: to a temporary file in the same folder, then moved into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import CaptureError
from ..files import atomic_file
from ..vocabulary import renamed
from .frames import (
    as_rgb,
    color_range,
    denoising_frame,
    has_previews,
    heat_frame,
    image_size_of,
    resolve_target,
    step_label,
    target_map,
)
from .style import HEAT_CMAP

_BG = (255, 255, 255)
_INK = (20, 20, 20)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(rgb: np.ndarray, side: int) -> Image.Image:
    """``rgb`` enlarged (nearest neighbour: pixels stay crisp) so that its longer side is ``side``."""
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    return Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))), Image.NEAREST)


def compose(panels: list[tuple[np.ndarray, str]], header: str, side: int = 192, gap: int = 6) -> Image.Image:
    """One frame: a header line, then the panels in a row, each with its label above it."""
    font = _font(12)
    pics = [(_fit(rgb, side), label) for rgb, label in panels]
    label_h, header_h = 16, 20
    width = sum(p.width for p, _ in pics) + gap * (len(pics) + 1)
    height = header_h + label_h + max(p.height for p, _ in pics) + gap
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 3), header, fill=_INK, font=font)
    x = gap
    for pic, label in pics:
        draw.text((x, header_h), label, fill=_INK, font=font)
        canvas.paste(pic, (x, header_h + label_h))
        x += pic.width + gap
    return canvas


@renamed(prompt="prompt_index")
def animation_frames(
    trace,
    words,
    image=None,
    *,
    prompt_index: int = 0,
    layers=None,
    heads=None,
    preview: str | None = "x0",
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    side: int = 160,
) -> list[Image.Image]:
    """The frames of ``animate``, one per captured step, as PIL images."""
    items = [words] if isinstance(words, (str, int, tuple)) else list(words)
    targets = [resolve_target(trace, w, prompt_index) for w in items]
    if preview not in (None, "x0", "xt", "both"):
        raise CaptureError(f"preview={preview!r}: use 'x0', 'xt', 'both' or None")
    if not has_previews(trace):
        preview = None
    size = image_size_of(trace, image)
    # maps[word][step], each word on one colour scale over the steps (scale="shared") or its own per step
    heats = [
        [target_map(trace, t, prompt_index=prompt_index, steps=[s], layers=layers, heads=heads, size=size) for s in trace.steps]
        for t in targets
    ]
    ranges = [[None] * len(hs) if scale == "each" else color_range(hs, scale) for hs in heats]
    base_image = None if image is None else as_rgb(image)
    frames = []
    for i, s in enumerate(trace.steps):
        panels = []
        base = base_image
        if preview is not None:
            d = denoising_frame(trace, s, prompt_index=prompt_index)
            if preview in ("xt", "both") and d.xt is not None:
                panels.append((d.xt, "x_t"))
            if preview in ("x0", "both") and d.x0 is not None:
                panels.append((d.x0, "predicted x0"))
            if base is None:
                base = d.x0 if d.x0 is not None else d.xt
            if base is not None and base.shape[:2] != tuple(size):
                base = np.asarray(Image.fromarray(base).resize((size[1], size[0]), Image.BILINEAR))
        for t, hs, rs in zip(targets, heats, ranges):
            panels.append((heat_frame(hs[i], base, t.label, alpha=alpha, cmap=cmap, vrange=rs[i]).rgb, t.label))
        frames.append(compose(panels, f"{step_label(trace, s)}   ({i + 1}/{len(trace.steps)})", side=side))
    return frames


@renamed(prompt="prompt_index")
def animate(
    trace,
    words,
    path,
    image=None,
    *,
    prompt_index: int = 0,
    layers=None,
    heads=None,
    preview: str | None = "x0",
    alpha: float = 0.6,
    cmap: str = HEAT_CMAP,
    scale="shared",
    fps: float = 4.0,
    hold: int = 4,
    side: int = 160,
) -> Path:
    """Write a GIF with one frame per captured step: the image being denoised beside the words' maps.

    ``words``: one word (or word index, ``"<start>"``, ...) or a list; one panel each. ``preview``:
    which denoising preview to show when the trace recorded them (``record_latents=True``):
    ``"x0"`` (the predicted clean image), ``"xt"``, ``"both"`` or None. Maps are drawn on ``image``
    (the final image) when given, else on the step's preview. ``scale="shared"`` (default) keeps
    each word on one colour scale over all steps, so the map is seen to strengthen as it forms;
    ``"each"`` rescales every frame. The last frame is held ``hold`` frames longer. Returns the path.
    """
    path = Path(path)
    frames = animation_frames(
        trace, words, image, prompt_index=prompt_index, layers=layers, heads=heads, preview=preview,
        alpha=alpha, cmap=cmap, scale=scale, side=side,
    )
    ms = max(20, round(1000 / fps))
    durations = [ms] * len(frames)
    durations[-1] = ms * (1 + hold)
    with atomic_file(path, ".gif") as tmp:  # never leave a half-written GIF behind
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path

"""Reading an image back into objects, and scoring an image against a caption.

The analyzer knows the world's rules and nothing else, so it works the same on clean renders and on
a model's (blurry, noisy) samples:

1. colour: every pixel takes the nearest palette colour (the four object colours or the background);
2. objects: the connected regions of one colour (4-neighbours), ignoring blobs smaller than 1% of the image;
3. shape: the ideal circle, square and triangle are drawn into the blob's bounding box, and the one
   that overlaps the blob best (intersection over union) wins. A square fills its box, a circle
   π/4 ≈ 0.785 of it, a triangle 0.5, so the three are far apart;
4. position: the blob's centroid is left/right of the centre if it is further from the centre
   horizontally than vertically, else top/bottom;
5. size: the half-size r that a shape of the blob's area has (a circle covers πr², a square 4r², a
   triangle 2r²) against the midpoints between the size ranges: "small", usual (None) or "big".

>>> from sdlens.world import parse_caption, render
>>> image = render(parse_caption("a red circle on the left")).image
>>> [(d.color, d.shape, d.position) for d in analyze(image)]
[('red', 'circle', 'left')]
>>> score(image, "a red square on the left")["all"]
False
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdlens.world.render import SIZE_RADII, signed_distance
from sdlens.world.scene import BACKGROUND, COLORS, SHAPES, Obj, Scene, parse_caption

from ..errors import WorldError

PALETTE_NAMES: tuple[str, ...] = ("background", *COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float64)  # (5, 3) RGB 0..255
MIN_AREA_FRACTION = 0.01  # blobs smaller than this fraction of the image are noise, not objects
SHAPE_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # a shape's area over its half-size squared
# Half-sizes (unit coordinates) between the size ranges: below the first is "small", above the second "big".
SIZE_BOUNDS = ((SIZE_RADII["small"][1] + SIZE_RADII[None][0]) / 2, (SIZE_RADII[None][1] + SIZE_RADII["big"][0]) / 2)


@dataclass(frozen=True, eq=False)
class Detected:
    """One object found in an image.

    mask:         (H, W) bool, the object's pixels
    centroid:     (x, y) in unit coordinates (x to the right, y downwards, 0..1)
    area:         number of pixels
    shape_scores: intersection over union of the blob with each ideal shape
    radius:       the half-size of its shape with the blob's area, in unit coordinates
    size:         "small", None (the usual size) or "big", from the radius
    """

    color: str
    shape: str
    position: str
    mask: np.ndarray
    centroid: tuple[float, float]
    area: int
    shape_scores: dict[str, float] = field(default_factory=dict)
    radius: float = 0.0
    size: str | None = None


def to_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image → float (H, W, 3) in 0..255 (whole numbers): uint8 (H, W, 3) (or a PIL image), float
    (H, W, 3) in 0..1 (a pipeline's ``output_type="np"``, quantised as saving it to uint8 would), or
    float (3, H, W) in [-1, 1] (the model's own range)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image.astype(np.float64)
    floating = np.issubdtype(image.dtype, np.floating) and image.ndim == 3
    if floating and image.shape[0] == 3:
        return np.clip((image.transpose(1, 2, 0).astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)
    if floating and image.shape[-1] == 3:
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise WorldError(f"a float (H, W, 3) image must be in 0..1 (as output_type='np' gives); this one spans "
                             f"{lo:.2f}..{hi:.2f}")
        return np.clip(np.round(image.astype(np.float64) * 255.0), 0.0, 255.0)
    raise WorldError(
        f"expected a uint8 (H, W, 3) image, a float (H, W, 3) image in 0..1 or a float (3, H, W) image in "
        f"[-1, 1]; got dtype {image.dtype} and shape {tuple(image.shape)}"
    )


def segment(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float 0..255 → (H, W) int, the index in PALETTE_NAMES of each pixel's nearest colour."""
    distances = ((rgb[:, :, None, :] - PALETTE[None, None, :, :]) ** 2).sum(-1)  # (H, W, 5)
    return distances.argmin(-1)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """Give every 4-connected region of equal, non-zero label its own id.

    labels: (H, W) int, 0 is background. Returns (H, W) int: for a foreground pixel, the smallest
    flat index (row * W + col) of its region; for a background pixel, its own flat index.

    Each round, every pixel takes the smallest id among itself and its same-label neighbours, then
    looks its id up again ("pointer jumping": the pixel an id names holds an id at least as small),
    until nothing changes. It needs a few dozen rounds for objects of tens of pixels.
    """
    h, w = labels.shape
    ids = np.arange(h * w).reshape(h, w)
    padded_labels = np.pad(labels, 1, constant_values=-1)  # (H + 2, W + 2); -1 matches nothing
    foreground = labels > 0
    neighbours = [(0, 1), (2, 1), (1, 0), (1, 2)]  # up, down, left, right, as offsets into the padding
    same = [(padded_labels[dy : dy + h, dx : dx + w] == labels) & foreground for dy, dx in neighbours]
    while True:
        padded_ids = np.pad(ids, 1, constant_values=h * w)
        new = ids.copy()
        for (dy, dx), same_label in zip(neighbours, same):
            new = np.where(same_label, np.minimum(new, padded_ids[dy : dy + h, dx : dx + w]), new)
        new = new.reshape(-1)[new]  # pointer jumping
        if np.array_equal(new, ids):
            return ids
        ids = new


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """The shape whose ideal form, drawn to fill the mask's bounding box, overlaps the mask best.

    mask: (H, W) bool, one blob. Returns the shape's name and the intersection over union per shape.
    """
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = mask[top:bottom, left:right]  # (h, w)
    h, w = crop.shape
    # pixel centres in box coordinates: -1 at one edge of the box, +1 at the other
    u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]  # (1, w)
    v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]  # (h, 1)
    scores = {}
    for shape in SHAPES:
        ideal = signed_distance(shape, u, v, 1.0) < 0  # (h, w)
        scores[shape] = float((crop & ideal).sum() / (crop | ideal).sum())
    return max(scores, key=scores.__getitem__), scores


def size_of(radius: float) -> str | None:
    """The size word of an object's half-size: "small", None (the usual size) or "big"."""
    if radius < SIZE_BOUNDS[0]:
        return "small"
    return "big" if radius > SIZE_BOUNDS[1] else None


def position_of(x: float, y: float) -> str:
    """Which position region a point (unit coordinates) is in: the larger offset from the centre decides."""
    dx, dy = x - 0.5, y - 0.5
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def analyze(image: np.ndarray | torch.Tensor, min_area_fraction: float = MIN_AREA_FRACTION) -> list[Detected]:
    """The objects in an image, largest first.

    image: uint8 (H, W, 3), float (H, W, 3) in 0..1, or float (3, H, W) in [-1, 1] (numpy or torch).
    """
    labels = segment(to_rgb(image))  # (H, W)
    h, w = labels.shape
    components = connected_components(labels)  # (H, W)
    found = []
    for component in np.unique(components[labels > 0]):
        mask = components == component  # (H, W)
        area = int(mask.sum())
        if area < min_area_fraction * h * w:
            continue
        rows, cols = np.nonzero(mask)
        centroid = ((cols.mean() + 0.5) / w, (rows.mean() + 0.5) / h)
        shape, scores = classify_shape(mask)
        color = PALETTE_NAMES[labels.reshape(-1)[component]]
        radius = math.sqrt(area / SHAPE_AREA[shape]) / max(h, w)  # the half-size a shape of this area has
        found.append(Detected(color, shape, position_of(*centroid), mask, centroid, area, scores,
                              float(radius), size_of(radius)))
    return sorted(found, key=lambda d: -d.area)


def describe(image: np.ndarray | torch.Tensor) -> str:
    """What the analyzer sees, in words: ``"red circle, blue square"`` (largest first) or ``"no object found"``."""
    return ", ".join(f"{d.color} {d.shape}" for d in analyze(image)) or "no object found"


def object_mask(image: np.ndarray | torch.Tensor, color: str) -> np.ndarray | None:
    """The mask ``(H, W)`` of the largest object of ``color`` in the image, or None when there is none."""
    return next((d.mask for d in analyze(image) if d.color == color), None)


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Intersection over union of two boolean masks (0 when either is missing or both are empty)."""
    if a is None or b is None:
        return 0.0
    return float((a & b).sum() / max((a | b).sum(), 1))


def _match(objects: tuple[Obj, ...], detected: list[Detected]) -> list[Detected | None]:
    """Pair each object of a caption with a detection.

    First by colour (the largest blob of the object's colour); an object whose colour is missing
    then takes a free detection at its position, else the largest free one, so that its shape and
    position can still be judged.
    """
    matches: list[Detected | None] = []
    for obj in objects:
        matches.append(next((d for d in detected if d.color == obj.color), None))
    for i, obj in enumerate(objects):
        if matches[i] is None:
            free = [d for d in detected if not any(d is m for m in matches)]
            at_position = [d for d in free if d.position == obj.position]
            matches[i] = (at_position or free or [None])[0]
    return matches


def score(image: np.ndarray | torch.Tensor, caption: str | Scene) -> dict[str, Any]:
    """How well an image shows a caption.

    Returns a dict with booleans ``color``, ``shape``, ``position`` and ``size`` (true when every
    object of the caption has it right; a position or size the caption does not give is not judged,
    so it counts as right), ``count`` (as many objects in the image as in the caption) and ``all``
    (all five); ``objects``, one dict per caption object with its ``object``, matched ``detected``
    (or None) and the four booleans; and ``detected``, everything the analyzer found.
    """
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    detected = analyze(image)
    objects = []
    for obj, det in zip(scene.objects, _match(scene.objects, detected)):
        objects.append(
            {
                "object": obj,
                "detected": det,
                "color": det is not None and det.color == obj.color,
                "shape": det is not None and det.shape == obj.shape,
                "position": det is not None and (obj.position is None or det.position == obj.position),
                "size": det is not None and (obj.size is None or det.size == obj.size),
            }
        )
    keys = ("color", "shape", "position", "size")
    result: dict[str, Any] = {key: all(o[key] for o in objects) for key in keys}
    result["count"] = len(detected) == len(scene.objects)
    result["all"] = all(result[key] for key in keys) and result["count"]
    result["objects"] = objects
    result["detected"] = detected
    return result

"""Drawing scenes: a readable one-scene renderer in numpy and a vectorised batch renderer in torch.

Geometry, in unit coordinates (x to the right, y downwards, both from 0 to 1 across the image, so
any image size works): an object at position "left" is centred near (0.25, 0.5), "right" near
(0.75, 0.5), "top" near (0.5, 0.25), "bottom" near (0.5, 0.75). Each object has a half-size ``r``:

- circle:   the points closer than r to the centre;
- square:   the points with max(|dx|, |dy|) < r, an axis-aligned square of side 2r;
- triangle: apex up at (0, -r), base corners at (±r, +r) relative to the centre (fills half its box).

The seed jitters each centre by up to ±CENTRE_JITTER along each axis and the half-size by up to
±RADIUS_JITTER around RADIUS. With these numbers two objects at opposite positions are always at
least 0.08 apart (5 pixels at 64×64) and every object keeps 0.04 from the image's border.

Both renderers draw from a signed distance ``sd`` (negative inside the shape, in units of the image
width). A pixel's coverage is ``clip(0.5 - sd · size, 0, 1)``: 1 well inside, 0 well outside and a
linear ramp one pixel wide across the edge, which anti-aliases the edges without supersampling.
An object's mask is the pixels whose centre is inside the shape (coverage > 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sdlens.world.scene import BACKGROUND, COLORS, SHAPES, Scene

POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
CENTER_JITTER = 0.05  # each centre coordinate moves by up to ± this
RADIUS = 0.14  # an object's half-size: 9 pixels at 64×64
RADIUS_JITTER = 0.02  # the half-size varies by up to ± this, so objects are 15 to 20 pixels across at 64×64

MAX_OBJECTS = 2


@dataclass(frozen=True)
class Placement:
    """Where one object is drawn: centre (x, y) and half-size r, in unit coordinates."""

    x: float
    y: float
    r: float


@dataclass(frozen=True, eq=False)
class Rendering:
    """A rendered scene.

    image:      (H, W, 3) uint8
    masks:      (n_objects, H, W) bool, one per object in the scene's order
    scene:      the scene drawn
    placements: one Placement per object (the jittered centres and sizes)
    """

    image: np.ndarray
    masks: np.ndarray
    scene: Scene
    placements: tuple[Placement, ...]


def place(scene: Scene, rng: np.random.Generator) -> tuple[Placement, ...]:
    """Jittered centre and size of each object (uniform within ±CENTER_JITTER and ±RADIUS_JITTER)."""
    placements = []
    for obj in scene.objects:
        x0, y0 = POSITION_CENTERS[obj.position]
        jx, jy, jr = rng.uniform(-1.0, 1.0, size=3)
        placements.append(
            Placement(x0 + jx * CENTER_JITTER, y0 + jy * CENTER_JITTER, RADIUS + jr * RADIUS_JITTER)
        )
    return tuple(placements)


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to the edge of a shape centred at the origin: < 0 inside, > 0 outside.

    dx, dy: offsets from the centre, broadcastable to each other (e.g. (1, W) and (H, 1)) → (H, W).
    Exact for the circle; for the square and triangle it is exact near the edges (the maximum of the
    distances to the sides' lines), which is all the anti-aliasing needs.
    """
    if shape == "circle":
        return np.sqrt(dx**2 + dy**2) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "triangle":
        # the base line y = r, and the two slanted sides with outward normals (±2, -1)/√5
        return np.maximum(dy - r, (2 * np.abs(dx) - dy - r) / math.sqrt(5))
    raise ValueError(f"unknown shape {shape!r}; valid shapes are: {', '.join(SHAPES)}")


def pixel_centers(size: int) -> np.ndarray:
    """(size,) unit coordinates of the pixel centres: (i + 0.5) / size."""
    return (np.arange(size) + 0.5) / size


def render(scene: Scene, size: int = 64, seed: int = 0) -> Rendering:
    """Draw one scene, deterministically from ``seed``. Returns the image and one mask per object."""
    placements = place(scene, np.random.default_rng(seed))
    xs = pixel_centers(size)[None, :]  # (1, W)
    ys = pixel_centers(size)[:, None]  # (H, 1)
    background = np.array(BACKGROUND, dtype=np.float64)
    image = np.broadcast_to(background, (size, size, 3)).copy()  # (H, W, 3), 0..255
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for i, (obj, p) in enumerate(zip(scene.objects, placements)):
        sd = signed_distance(obj.shape, xs - p.x, ys - p.y, p.r)  # (H, W)
        coverage = np.clip(0.5 - sd * size, 0.0, 1.0)  # (H, W)
        image += coverage[..., None] * (np.array(COLORS[obj.color], dtype=np.float64) - background)
        masks[i] = sd < 0
    return Rendering(np.rint(image).astype(np.uint8), masks, scene, placements)


# ---------------------------------------------------------------------------------------------
# The batch renderer: the same drawing, for N scenes at once, as tensor operations.

_SHAPE_IDS = {name: i for i, name in enumerate(SHAPES)}  # circle 0, square 1, triangle 2


def _encode(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes as tables with MAX_OBJECTS slots; empty slots hold zeros.

    Returns shape_ids (N, 2) long, colors (N, 2, 3) float 0..255, present (N, 2) bool and
    base centres (N, 2, 2) float (x, y) before jitter.
    """
    shape_ids, colors, present, centers = [], [], [], []
    for scene in scenes:
        objs, pad = scene.objects, MAX_OBJECTS - len(scene.objects)
        shape_ids.append([_SHAPE_IDS[o.shape] for o in objs] + [0] * pad)
        colors.append([COLORS[o.color] for o in objs] + [(0, 0, 0)] * pad)
        present.append([True] * len(objs) + [False] * pad)
        centers.append([POSITION_CENTERS[o.position] for o in objs] + [(0.0, 0.0)] * pad)
    return (
        torch.tensor(shape_ids, dtype=torch.long).reshape(-1, MAX_OBJECTS),
        torch.tensor(colors, dtype=torch.float32).reshape(-1, MAX_OBJECTS, 3),
        torch.tensor(present, dtype=torch.bool).reshape(-1, MAX_OBJECTS),
        torch.tensor(centers, dtype=torch.float32).reshape(-1, MAX_OBJECTS, 2),
    )


def draw_batch(
    scenes: list[Scene],
    centers: torch.Tensor,
    radii: torch.Tensor,
    size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw N scenes with the given placements.

    centers: (N, 2, 2) float, the (x, y) of each object slot in unit coordinates
    radii:   (N, 2) float, each object's half-size
    Returns images (N, 3, H, W) float in [-1, 1] and masks (N, 2, H, W) bool (empty slots all False).
    """
    shape_ids, colors, present, _ = (t.to(device) for t in _encode(scenes))
    centers, radii = centers.to(device, torch.float32), radii.to(device, torch.float32)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # (S,)
    dx = coords[None, None, None, :] - centers[..., 0, None, None]  # (N, 2, 1, W)
    dy = coords[None, None, :, None] - centers[..., 1, None, None]  # (N, 2, H, 1)
    r = radii[..., None, None]  # (N, 2, 1, 1)

    # the three signed distances of render.signed_distance, each (N, 2, H, W)
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    triangle = torch.maximum(dy - r, (2 * dx.abs() - dy - r) / math.sqrt(5))
    ids = shape_ids[..., None, None]  # (N, 2, 1, 1)
    sd = torch.where(ids == 0, circle, torch.where(ids == 1, square, triangle))  # (N, 2, H, W)

    slot = present[..., None, None]  # (N, 2, 1, 1)
    coverage = (0.5 - sd * size).clamp(0.0, 1.0) * slot  # (N, 2, H, W)
    masks = (sd < 0) & slot  # (N, 2, H, W)

    background = torch.tensor(BACKGROUND, device=device, dtype=torch.float32)  # (3,)
    images = background[None, :, None, None] + torch.einsum(
        "nkhw,nkc->nchw", coverage, colors - background
    )  # (N, 3, H, W), 0..255
    return images / 127.5 - 1.0, masks


def render_batch(
    scenes: list[Scene],
    size: int = 64,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw N scenes at once, with random jitter drawn from ``generator``.

    Returns images (N, 3, H, W) float in [-1, 1] and masks (N, 2, H, W) bool, where the mask of a
    missing second object is all False. Draws exactly what :func:`render` draws for the same
    placements (see :func:`draw_batch`).
    """
    _, _, _, base = _encode(scenes)
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(len(scenes), MAX_OBJECTS, 3, generator=generator, device=gen_device).cpu() * 2 - 1
    centers = base + u[..., :2] * CENTER_JITTER  # (N, 2, 2)
    radii = RADIUS + u[..., 2] * RADIUS_JITTER  # (N, 2)
    return draw_batch(scenes, centers, radii, size=size, device=device)

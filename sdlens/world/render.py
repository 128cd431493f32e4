"""Drawing scenes: a readable one-scene renderer in numpy and a vectorised batch renderer in torch.

Geometry, in unit coordinates (x to the right, y downwards, both from 0 to 1 across the image, so
any image size works): an object at position "left" is centred near (0.25, 0.5), "right" near
(0.75, 0.5), "top" near (0.5, 0.25), "bottom" near (0.5, 0.75). Each object has a half-size ``r``:

- circle:   the points closer than r to the centre;
- square:   the points with max(|dx|, |dy|) < r, an axis-aligned square of side 2r;
- triangle: apex up at (0, -r), base corners at (±r, +r) relative to the centre (fills half its box).

The seed jitters each centre by up to ±CENTRE_JITTER along each axis and draws the half-size
uniformly from its size's range (``SIZE_RADII``: the usual RADIUS ± RADIUS_JITTER, or the ranges of
"small" and "big"). With these numbers two objects at opposite positions never overlap and every
object stays inside the image.

An object whose caption gives no position is placed anywhere: its centre is uniform over the
places where it keeps MARGIN from the border, and a second such object is drawn again until its
box keeps GAP from the first's (at most FREE_TRIES draws; the rare scene that finds no place falls
back to the left/right centres), so the objects never overlap and the masks stay exact.

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

from ..errors import WorldError

POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
CENTER_JITTER = 0.05  # each centre coordinate moves by up to ± this
RADIUS = 0.14  # an object's half-size: 9 pixels at 64×64
RADIUS_JITTER = 0.02  # the half-size varies by up to ± this, so objects are 15 to 20 pixels across at 64×64
# The half-size range of each size word (None: no word). Far apart, so a size is readable from the
# image; "big" stays small enough that two big objects at opposite positions keep 2 pixels apart.
SIZE_RADII: dict[str | None, tuple[float, float]] = {
    None: (RADIUS - RADIUS_JITTER, RADIUS + RADIUS_JITTER),
    "small": (0.08, 0.095),
    "big": (0.17, 0.185),
}
MARGIN = 0.02  # an object placed freely keeps this from the image's border
GAP = 0.03  # two objects placed freely keep their boxes this far apart (2 pixels at 64×64)
FREE_TRIES = 32  # draws for the second of two freely placed objects
FALLBACK_CENTERS = ((0.25, 0.5), (0.75, 0.5))  # where they go if no draw fits (about 1 scene in 10^6)

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


def _radius(size: str | None, u: float) -> float:
    """The half-size at ``u`` in [-1, 1] across the range of ``size`` (its middle at 0)."""
    lo, hi = SIZE_RADII[size]
    return (lo + hi) / 2 + u * (hi - lo) / 2


def _apart(a: Placement, b: Placement) -> bool:
    """The boxes of two placements keep GAP between them (so the shapes inside cannot touch)."""
    return max(abs(a.x - b.x), abs(a.y - b.y)) > a.r + b.r + GAP


def place(scene: Scene, rng: np.random.Generator) -> tuple[Placement, ...]:
    """Centre and size of each object: at its position, jittered within ±CENTER_JITTER, or anywhere
    (uniform, never overlapping) when the caption gives none; the size uniform in its range."""
    placements: list[Placement] = []
    for obj in scene.objects:
        jx, jy, jr = rng.uniform(-1.0, 1.0, size=3)
        r = float(_radius(obj.size, jr))
        if obj.position is not None:
            x0, y0 = POSITION_CENTERS[obj.position]
            placements.append(Placement(x0 + jx * CENTER_JITTER, y0 + jy * CENTER_JITTER, r))
            continue
        for _ in range(FREE_TRIES):
            x, y = rng.uniform(r + MARGIN, 1 - r - MARGIN, size=2)
            candidate = Placement(float(x), float(y), r)
            if all(_apart(candidate, p) for p in placements):
                placements.append(candidate)
                break
        else:  # no free place found: the fixed left/right centres never overlap
            placements = [Placement(*FALLBACK_CENTERS[i], p.r) for i, p in enumerate([*placements, candidate])]
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
    raise WorldError(f"unknown shape {shape!r}; valid shapes are: {', '.join(SHAPES)}")


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

    Returns shape_ids (N, 2) long, colors (N, 2, 3) float 0..255, present (N, 2) bool,
    base centres (N, 2, 2) float (x, y) before jitter (0 where the caption gives no position) and
    the half-size range of each object (N, 2, 2) float (low, high).
    """
    shape_ids, colors, present, centers, ranges = [], [], [], [], []
    for scene in scenes:
        objs, pad = scene.objects, MAX_OBJECTS - len(scene.objects)
        shape_ids.append([_SHAPE_IDS[o.shape] for o in objs] + [0] * pad)
        colors.append([COLORS[o.color] for o in objs] + [(0, 0, 0)] * pad)
        present.append([True] * len(objs) + [False] * pad)
        centers.append([POSITION_CENTERS.get(o.position, (0.0, 0.0)) for o in objs] + [(0.0, 0.0)] * pad)
        ranges.append([SIZE_RADII[o.size] for o in objs] + [SIZE_RADII[None]] * pad)
    return (
        torch.tensor(shape_ids, dtype=torch.long).reshape(-1, MAX_OBJECTS),
        torch.tensor(colors, dtype=torch.float32).reshape(-1, MAX_OBJECTS, 3),
        torch.tensor(present, dtype=torch.bool).reshape(-1, MAX_OBJECTS),
        torch.tensor(centers, dtype=torch.float32).reshape(-1, MAX_OBJECTS, 2),
        torch.tensor(ranges, dtype=torch.float32).reshape(-1, MAX_OBJECTS, 2),
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
    shape_ids, colors, present, _, _ = (t.to(device) for t in _encode(scenes))
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
    _, _, present, base, ranges = _encode(scenes)
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(len(scenes), MAX_OBJECTS, 3, generator=generator, device=gen_device).cpu() * 2 - 1
    centers = base + u[..., :2] * CENTER_JITTER  # (N, 2, 2)
    lo, hi = ranges.unbind(-1)  # (N, 2) each
    radii = (lo + hi) / 2 + u[..., 2] * (hi - lo) / 2  # (N, 2)
    free = torch.tensor([not s.positioned for s in scenes], dtype=torch.bool)  # (N,)
    if free.any():  # drawn only when needed, so batches without free objects repeat as before
        tries = torch.rand(len(scenes), MAX_OBJECTS, FREE_TRIES, 2, generator=generator, device=gen_device).cpu()
        centers = torch.where(free[:, None, None], _free_centers(tries, radii, present), centers)
    return draw_batch(scenes, centers, radii, size=size, device=device)


def _free_centers(tries: torch.Tensor, radii: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Centres of freely placed objects, as ``place`` draws them: the first object at its first draw,
    the second at its first draw whose box keeps GAP from the first's (else the fallback centres).

    tries: (N, 2, T, 2) uniform in [0, 1); radii, present: (N, 2). Returns (N, 2, 2).
    """
    r = radii[..., None, None]  # (N, 2, 1, 1)
    cand = r + MARGIN + tries * (1 - 2 * (r + MARGIN))  # (N, 2, T, 2), inside the margin
    first = cand[:, 0, 0]  # (N, 2)
    dist = (cand[:, 1] - first[:, None]).abs().amax(-1)  # (N, T): box distance of each draw of the second
    fits = dist > (radii[:, 0] + radii[:, 1] + GAP)[:, None]  # (N, T)
    pick = fits.float().argmax(-1)  # the first draw that fits (0 if none does)
    second = cand[:, 1].gather(1, pick[:, None, None].expand(-1, 1, 2))[:, 0]  # (N, 2)
    out = torch.stack([first, second], dim=1)  # (N, 2, 2)
    stuck = present[:, 1] & ~fits.any(-1)  # two objects and no draw fits
    fallback = torch.tensor(FALLBACK_CENTERS, dtype=out.dtype)
    return torch.where(stuck[:, None, None], fallback, out)

"""The shapes world: scenes of one or two flat-coloured objects, their captions, a renderer that
also gives each object's mask, and an analyzer that reads images back into objects.

>>> from sdlens.world import parse_caption, render, score
>>> scene = parse_caption("a red circle on the left and a blue square on the right")
>>> rendering = render(scene, size=64, seed=0)
>>> rendering.image.shape, rendering.masks.shape
((64, 64, 3), (2, 64, 64))
>>> score(rendering.image, scene)["all"]
True
"""

from sdlens.world.analyze import Detected, analyze, describe, mask_iou, object_mask, score
from sdlens.world.data import VOCAB_WORDS, sample_batch
from sdlens.world.render import Placement, Rendering, draw_batch, render, render_batch
from sdlens.world.scene import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    object_words,
    parse_caption,
    sample_scene,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "VOCAB_WORDS",
    "Detected",
    "Obj",
    "Placement",
    "Rendering",
    "Scene",
    "analyze",
    "caption",
    "describe",
    "draw_batch",
    "mask_iou",
    "object_mask",
    "object_words",
    "parse_caption",
    "render",
    "render_batch",
    "sample_batch",
    "sample_scene",
    "score",
]

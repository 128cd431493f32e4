"""Training batches from the shapes world: random scenes, their captions, images and masks."""

from __future__ import annotations

import numpy as np
import torch

from sdlens.world.render import render_batch
from sdlens.world.scene import COLORS, POSITION_PHRASES, SHAPES, SIZES, Scene, caption, sample_scene

# Every word a caption can contain, in a fixed order.
VOCAB_WORDS: list[str] = list(
    dict.fromkeys(
        [
            "a",
            *SIZES,
            *COLORS,
            *SHAPES,
            *(word for phrase in POSITION_PHRASES.values() for word in phrase.split()),
            "and",
        ]
    )
)


def sample_batch(
    n: int,
    generator: torch.Generator | None = None,
    size: int = 64,
    two_object_prob: float = 0.5,
    device: str | torch.device = "cpu",
    free_prob: float = 0.0,
    size_prob: float = 0.0,
) -> tuple[torch.Tensor, list[str], list[Scene], torch.Tensor]:
    """n random scenes, drawn: everything random comes from ``generator``, so a seeded one repeats.

    ``free_prob``, ``size_prob``: the caption kinds, as ``sample_scene`` takes them (captions without
    positions; size words).

    Returns images (n, 3, size, size) float in [-1, 1], captions (n strings), scenes and
    masks (n, 2, size, size) bool (the second mask of a one-object scene is all False).
    """
    generator_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator_device))
    rng = np.random.default_rng(seed)  # scenes are drawn in numpy, seeded from the torch generator
    scenes = [
        sample_scene(rng, n_objects=2 if rng.random() < two_object_prob else 1, free_prob=free_prob, size_prob=size_prob)
        for _ in range(n)
    ]
    images, masks = render_batch(scenes, size=size, generator=generator, device=device)
    return images, [caption(s) for s in scenes], scenes, masks

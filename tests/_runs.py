"""One seeded generation, as the capture and pipeline tests run it."""

from __future__ import annotations

import torch

PROMPT = "a red circle on the left"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt: str = PROMPT, steps: int = 3, **kw):
    """``pipe(prompt)`` at 64×64 (unless given), seed 0: the images as numpy ``(n, H, W, 3)``."""
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    return pipe(prompt, num_inference_steps=steps, generator=gen(), output_type="np", **kw).images

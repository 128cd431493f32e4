"""How many bytes a trace of a real model would keep, by sdlens's own estimate, without its weights.

A trace's size depends on the model's layout (which layers, how many heads), the image and text
token counts, the steps and the spec, not on the weights. This builds each real model's layout with
random weights at minimal width (the block counts and token grids of the real one), starts a traced
run under ``max_bytes=1`` and prints the estimate the capture makes before the first block runs.

    python benchmarks/trace_size.py                     # the README's figures
    python benchmarks/trace_size.py --size 768 --steps 4

Models: Flux.1-dev (19 double + 38 single blocks, 512 T5 slots, 28 steps), Flux.1-schnell (256 slots,
4 steps), SD 3.5 Medium (24 joint blocks, 77 CLIP + 256 T5 slots, 40 steps), SD 3.5 Large (38 blocks,
28 steps). Image tokens: (size / 16)² for all four (VAE factor 8, then 2×2 patches).
"""

from __future__ import annotations

import argparse

import sdlens
from sdlens.errors import BudgetError
from sdlens.models.families import flux, sd35

MODELS = {  # name: (layout, text slots, default steps)
    "FLUX.1-dev": ("flux", 512, 28),
    "FLUX.1-schnell": ("flux", 256, 4),
    "stable-diffusion-3.5-medium": ("sd35-medium", 256, 40),
    "stable-diffusion-3.5-large": ("sd35-large", 256, 28),
}


def estimate(name: str, size: int, steps: int | None, **spec) -> tuple[int, int]:
    """``(bytes, layers)`` sdlens estimates for ``name`` at ``size`` px over ``steps`` steps."""
    layout, t5, default_steps = MODELS[name]
    steps = steps or default_steps
    if layout == "flux":
        pipe = flux(layers=19, single_layers=38)
        kw = {"max_sequence_length": t5}
    else:
        pipe = sd35(layers=24, dual_layers=13) if layout == "sd35-medium" else sd35(layers=38, dual_layers=0)
        kw = {"max_sequence_length": t5, "guidance_scale": 4.5}
    side = size // 8 * pipe.vae_scale_factor  # the stand-in VAE's factor is not 8: same token grid
    tracer = sdlens.trace(pipe, max_bytes=1, **spec)
    try:
        with tracer:
            pipe("a cat", num_inference_steps=steps, height=side, width=side, output_type="latent", **kw)
    except BudgetError:
        pass
    est = tracer.estimate
    return est.total, len(est.per_layer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=None, help="steps traced (default: each model's own)")
    args = ap.parse_args()
    print(f"sdlens.trace(pipe) defaults (cross-attention of every joint/single block, heads averaged, "
          f"conditional rows, float16), {args.size} px:")
    for name in MODELS:
        for label, spec in (("default", {}), ("+ concepts x3, text_attn", {"concepts": ["a", "b", "c"], "text_attn": True})):
            total, layers = estimate(name, args.size, args.steps, **spec)
            steps = args.steps or MODELS[name][2]
            print(f"  {name:30s} {label:26s} {layers:3d} layers × {steps:2d} steps: {total / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()

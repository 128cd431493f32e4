"""How many ATen ops tracing adds per denoising step: a proxy for a GPU run bound by kernel launches.

Counts every op PyTorch dispatches (a ``TorchDispatchMode``) during one untraced and one traced
generation of the SD 1.5 UNet layout (random weights, tiny width, CPU), cross-attention of all 16
layers kept. The first traced step also allocates the trace's storage; the script runs 2 and 3
steps and reports the difference, so that only the per-step cost is printed.

    python benchmarks/capture_ops.py
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdlens
from sdlens.models.families import sd15_layout


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    pipe = sd15_layout(width=8, sample_size=8)

    def count(steps: int, traced: bool) -> collections.Counter[str]:
        def generate():
            pipe("a red circle", num_inference_steps=steps, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0))

        with torch.no_grad():
            if traced:
                with sdlens.trace(pipe), OpCounter() as c:
                    generate()
            else:
                with OpCounter() as c:
                    generate()
        return c.counts

    count(1, False)  # warm-up
    extra = {}
    for steps in (2, 3):
        traced, plain = count(steps, True), count(steps, False)
        diff = traced.copy()
        diff.subtract(plain)
        extra[steps] = diff
    per_step = extra[3].copy()
    per_step.subtract(extra[2])
    plain_step = count(3, False).total() - count(2, False).total()
    print("model: SD 1.5 UNet layout (16 cross-attention layers), width 8, 64 px, CFG batch 2, CPU")
    print(f"ops per step, untraced: {plain_step}")
    print(f"extra ops per step, traced (cross-attention, all layers, heads averaged): {per_step.total()}")
    print("  by op: " + ", ".join(f"{k} {v}" for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v))


if __name__ == "__main__":
    main()

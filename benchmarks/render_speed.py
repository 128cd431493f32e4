"""How fast the shapes world renders a training batch: 256 scenes, best of a few runs.

    python benchmarks/render_speed.py [--n 256] [--repeats 5]

Prints the best time of ``render_batch`` for ``--n`` scenes (the goal: well under 50 ms on a 2-core
CPU, so that training is never waiting for data).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sdlens.world import render_batch, sample_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(args.n)]
    generator = torch.Generator().manual_seed(0)
    render_batch(scenes, generator=generator)  # warm up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        render_batch(scenes, generator=generator)
        times.append(time.perf_counter() - start)
    print(f"render_batch of {args.n} scenes: best {min(times) * 1000:.1f} ms, "
          f"median {sorted(times)[len(times) // 2] * 1000:.1f} ms ({args.repeats} runs, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()

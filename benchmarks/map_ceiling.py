"""The best IoU a word map can reach at a given attention grid, on the shapes world's objects.

    python benchmarks/map_ceiling.py              # 300 one-object scenes, grids 8x8 and 16x16
    python benchmarks/map_ceiling.py --n 1000 --grids 4,8,16

`benchmarks/quality.py` scores a word map by the IoU of its upper half (min-max normalised, >= 0.5)
with the object's mask, after upsampling the map bilinearly from its layer's grid to the image.
A layer with an h x w grid cannot draw an outline finer than its cells, so a low IoU may be the
grid's fault rather than the model's. This prints the ceiling: the IoU of the most object-like map
such a grid can hold (the object's own mask averaged into the grid's cells), upsampled and
thresholded exactly as the benchmark does (`sdlens.analysis.localisation`), per size word. tiny-sd3
attends over an 8x8 grid of 2x2 latent patches; the UNet model's attention layers over 16x16 and 8x8.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def ceiling_iou(mask: np.ndarray, grid: int) -> float:
    """IoU with `mask` (H, W) of the mask averaged into `grid` x `grid` cells and upsampled back."""
    from sdlens.analysis import localisation
    from sdlens.maps import upsample

    size = mask.shape
    cells = F.adaptive_avg_pool2d(torch.tensor(mask, dtype=torch.float32)[None, None], grid)[0, 0]  # (grid, grid)
    return localisation(upsample(cells, size), mask)["iou"]


def main(argv: list[str] | None = None) -> int:
    from sdlens.world import render, sample_scene

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="one-object scenes")
    parser.add_argument("--grids", default="8,16", help="attention grid sides, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grids = [int(g) for g in args.grids.split(",")]
    rng = np.random.default_rng(args.seed)
    ious: dict[tuple[int, str], list[float]] = {}
    for i in range(args.n):
        scene = sample_scene(rng, n_objects=1, free_prob=0.5, size_prob=0.35)
        mask = render(scene, size=64, seed=i).masks[0]
        for g in grids:
            iou = ceiling_iou(mask, g)
            for key in ("all", scene.objects[0].size or "usual"):
                ious.setdefault((g, key), []).append(iou)
    print(f"{args.n} one-object scenes of 64x64 px; ceiling IoU of a word map per attention grid "
          "(mean, and the 10th percentile)")
    print("| grid | all | small | usual size | big |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for g in grids:
        cells = [ious.get((g, k), []) for k in ("all", "small", "usual", "big")]
        print(f"| {g}x{g} | " + " | ".join(
            f"{np.mean(v):.2f} ({np.percentile(v, 10):.2f})" if v else "–" for v in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

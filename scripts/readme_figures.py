"""Draw README's picture: a two-object image from the built-in model, each word's map, the true masks.

    python scripts/readme_figures.py --out docs/two_objects.png

The "true masks" are the generated image's own objects as the shapes-world analyzer finds them
(as in benchmarks/quality.py): the model places objects itself, so the caption alone does not say
where their pixels are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sdlens  # noqa: E402
from sdlens.maps import normalize  # noqa: E402
from sdlens.world import analyze, parse_caption  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", default="docs/two_objects.png")
    args = ap.parse_args()

    pipe = sdlens.load_pipeline()
    with sdlens.trace(pipe) as tr:
        image = pipe(args.prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(args.seed),
                     output_type="np").images[0]
    image_u8 = (image * 255).round().astype(np.uint8)
    scene = parse_caption(args.prompt)
    found = {d.color: d for d in analyze(image_u8)}
    words = tr.words()
    gray = image_u8.mean(axis=2) / 255  # heat drawn over a grey copy: red heat on a blue object stays readable
    panels = [("image", image_u8, None)]
    for i, obj in enumerate(scene.objects):
        base = 7 * i  # "a <colour> <shape> on the <position>" then "and"
        for w in (obj.color, obj.shape):
            wi = words.index(w, base)
            panels.append((f"“{w}”", gray, normalize(tr.word_map(wi)).numpy()))
        det = found.get(obj.color)
        mask = det.mask if det is not None else np.zeros(image_u8.shape[:2], bool)
        panels.append((f"mask: {obj.color} {obj.shape}", mask.astype(float), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.5))
    for ax, (title, base_img, heat) in zip(axes, panels):
        ax.imshow(base_img, cmap="gray" if base_img.ndim == 2 else None, vmin=0, vmax=1 if base_img.ndim == 2 else None)
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"“{args.prompt}” — built-in model, 25 steps; word maps averaged over steps, layers, heads", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()

"""Draw README's pictures from the built-in model.

    python scripts/readme_figures.py --out docs/two_objects.png --free-out docs/free_position.png

1. a two-object image, each colour and shape word's map, the true masks;
2. a prompt without a position ("a red circle") from six seeds: where the noise puts the object,
   and the shape word's map following it (one colour scale for all six maps).

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
from sdlens.viz import HEAT_CMAP, framed_mask, outline  # noqa: E402
from sdlens.world import analyze, parse_caption  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", default="docs/two_objects.png")
    ap.add_argument("--free-prompt", default="a red circle")
    ap.add_argument("--free-out", default="docs/free_position.png")
    args = ap.parse_args()
    pipe = sdlens.load_pipeline()
    two_objects(pipe, args)
    free_position(pipe, args)


def two_objects(pipe, args) -> None:
    with sdlens.trace(pipe) as tr:
        image = pipe(args.prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(args.seed),
                     output_type="np").images[0]
    image_u8 = (image * 255).round().astype(np.uint8)
    scene = parse_caption(args.prompt)
    found = {d.color: d for d in analyze(image_u8)}
    words = tr.words()
    gray = image_u8.mean(axis=2) / 255  # heat drawn over a grey copy: the heat colours never mix with the objects' own
    fig, axes = plt.subplots(1, 1 + 3 * len(scene.objects), figsize=(2.1 * (1 + 3 * len(scene.objects)), 2.5))
    panels = iter(axes)  # the image, then per object: its colour word, its shape word, its mask
    ax = next(panels)
    ax.imshow(image_u8)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    for i, obj in enumerate(scene.objects):
        base = 7 * i  # "a <colour> <shape> on the <position>" then "and"
        det = found.get(obj.color)
        mask = det.mask if det is not None else np.zeros(image_u8.shape[:2], bool)
        for w in (obj.color, obj.shape):
            ax = next(panels)
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
            ax.imshow(normalize(tr.word_map(words.index(w, base))).numpy(), cmap=HEAT_CMAP, alpha=0.6, vmin=0, vmax=1)
            outline(ax, mask)  # the object the word names
            ax.set_title(f"“{w}”", fontsize=9)
            ax.axis("off")
        framed_mask(next(panels), mask, f"mask: {obj.color} {obj.shape}")
    fig.suptitle(f"“{args.prompt}” — built-in model, 25 steps; word maps averaged over steps, layers, heads, "
                 "each scaled to its own 0..1; white line: the object the word names", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


def free_position(pipe, args, seeds=(0, 1, 2, 3, 4, 5)) -> None:
    scene = parse_caption(args.free_prompt)
    if len(scene.objects) != 1 or scene.objects[0].position is not None:
        raise SystemExit(f"--free-prompt needs one object and no position, got {args.free_prompt!r}")
    obj = scene.objects[0]
    runs = []
    for seed in seeds:
        with sdlens.trace(pipe) as tr:
            image = pipe(args.free_prompt, num_inference_steps=25, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images[0]
        runs.append(((image * 255).round().astype(np.uint8), tr.word_map(obj.shape).numpy()))
    top = max(float(heat.max()) for _, heat in runs)  # one scale: the maps can be compared
    fig, axes = plt.subplots(2, len(runs), figsize=(1.9 * len(runs) + 0.9, 4.2), squeeze=False)
    for seed, (image, heat), ax_im, ax_map in zip(seeds, runs, axes[0], axes[1]):
        found = [d for d in analyze(image) if d.color == obj.color]
        ax_im.imshow(image)
        ax_im.set_title(f"seed {seed}: " + (found[0].position if found else "not found"), fontsize=9)
        ax_map.imshow(image.mean(axis=2) / 255, cmap="gray", vmin=0, vmax=1)
        shown = ax_map.imshow(heat, cmap=HEAT_CMAP, alpha=0.7, vmin=0, vmax=top)
        if found:  # the object's outline, from the analyzer's mask
            outline(ax_map, found[0].mask)
        ax_map.set_title(f"“{obj.shape}”", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1].tolist(), fraction=0.02, label="attention (0 to max of all six)")
    fig.suptitle(f"“{args.free_prompt}”: the prompt gives no position, the seed's noise decides it "
                 "(white outline: the object the analyzer finds)", fontsize=9)
    Path(args.free_out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.free_out, dpi=110)
    print(args.free_out)


if __name__ == "__main__":
    main()

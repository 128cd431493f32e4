"""Which blocks of a joint-attention model localise a word, read each way?

    python benchmarks/joint_blocks.py                       # tiny-sd3, 8 one-object captions of each kind
    python benchmarks/joint_blocks.py --model runs/tiny-sd3-11 --n 20 --seed 12345

For one-object captions of every caption kind of the world (`quality.py`'s captions, here from
`--seed`), it generates each image traced with the text tokens' queries (`text_attn=True`) and, for
the object's colour and shape word, measures `quality.py`'s localisation (IoU of the map's upper
half with the detected object; how often the map's peak lies on it) for the map of each block alone
and of all blocks averaged, in both directions of joint attention: the pixels' attention to the word
("image_text") and the word's own attention over the image ("text_image"). A block whose pixels'
map peaks on the object far less often than chance points at the background.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import CAPTION_KINDS, eval_captions  # noqa: E402  the benchmark's captions and kinds

from sdlens.analysis import localisation  # noqa: E402
from sdlens.world import object_words, parse_caption, score  # noqa: E402

DIRECTIONS = ("image_text", "text_image")
WORDS = ("color", "shape")


def measure(pipe, captions, *, steps: int, guidance: float, batch: int = 8) -> dict:
    """``{(block, direction, word kind): [localisation, ...]}``; block ``"all"`` is every block averaged."""
    import sdlens

    out: dict = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        gens = [torch.Generator(pipe.device).manual_seed(s) for _, s in chunk]
        with sdlens.trace(pipe, text_attn=True) as tr:
            images = pipe([c for c, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="np").images
        images = (images * 255).round().clip(0, 255).astype(np.uint8)
        blocks = [("all", None)] + [(name, [name]) for name in tr.layers_of("cross")]
        for i, (text, _) in enumerate(chunk):
            scene = parse_caption(text)
            obj = scene.objects[0]
            det = next((d for d in score(images[i], scene)["detected"] if d.color == obj.color), None)
            if det is None:
                continue
            for kind in WORDS:
                word = object_words(text)[0][kind]
                for label, layers in blocks:
                    for d in DIRECTIONS:
                        heat = tr.word_map(word, prompt_index=i, layers=layers, direction=d, size=images.shape[1:3])
                        out.setdefault((label, d, kind), []).append(localisation(heat, det.mask))
    return out


def table(results: dict) -> str:
    blocks = list(dict.fromkeys(b for b, _, _ in results))
    lines = ["| block | " + " | ".join(f"{k} {d} IoU / peak" for d in DIRECTIONS for k in WORDS) + " |",
             "| --- |" + " ---: |" * (len(DIRECTIONS) * len(WORDS))]
    for b in blocks:
        cells = []
        for d in DIRECTIONS:
            for k in WORDS:
                xs = results[b, d, k]
                cells.append(f"{np.mean([x['iou'] for x in xs]):.2f} / {np.mean([x['peak'] for x in xs]):.0%}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd3", help="a joint-attention model: 'tiny-sd3' or a pipeline folder")
    parser.add_argument("--n", type=int, default=8, help="one-object captions of each caption kind")
    parser.add_argument("--seed", type=int, default=12345, help="captions and noise (quality.py's held-out seed is another)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    args = parser.parse_args(argv)

    from sdlens.models import load_pipeline

    pipe = load_pipeline(args.model)
    if getattr(pipe, "transformer", None) is None:
        parser.error(f"--model {args.model!r} has no joint attention (no transformer): use tiny-sd3 or an SD 3 folder")
    captions = [c for c in eval_captions(args.n, args.seed, tuple(CAPTION_KINDS)) if len(parse_caption(c[0]).objects) == 1]
    results = measure(pipe, captions, steps=args.steps, guidance=args.guidance)
    n = len(results["all", "image_text", "shape"])
    print(f"model {args.model}: {n} one-object images found of {len(captions)} ({args.n} per caption kind), "
          f"{args.steps} steps, guidance {args.guidance}, seed {args.seed}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

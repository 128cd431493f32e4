"""Where does the second object's colour word look? The figures behind notes/tiny_model.md's diagnosis.

    python benchmarks/colour_words.py                      # the built-in model
    python benchmarks/colour_words.py --model runs/world6  # any pipeline folder

On N held-out two-object captions without positions (quality.py's "free" kind, its seeds), at 25
steps and guidance 7.5, it prints:

- where the map of the second colour word (all steps, layers and heads, as `trace.word_map`) has
  its maximum: on its own object, on the first object, or on the background;
- per word (first / second colour, first / second shape), the median over captions of the map's
  mean on its object divided by its mean elsewhere (1 = a flat map);
- in the text encoder's output, the cosine similarity of the slot of "blue" as the second object's
  colour with the same word as the first object, after another first object, and with the "and"
  and "a" before it (a slot that mostly carries the phrase before it is like its neighbours).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from quality import EVAL_SEED, PromptMaps, eval_captions, object_words

import sdlens
from sdlens.world import parse_caption, score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (built in) or a pipeline folder")
    ap.add_argument("--n", type=int, default=20, help="two-object captions")
    args = ap.parse_args(argv)
    from sdlens.models import load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    captions = [c for c in eval_captions(args.n, seed=EVAL_SEED, kinds=("free",)) if " and " in c[0]]
    prompts = [c for c, _ in captions]
    with sdlens.trace(pipe) as tr:
        images = pipe(prompts, num_inference_steps=25, guidance_scale=7.5, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(s) for _, s in captions]).images
    images = (images * 255).round().clip(0, 255).astype(np.uint8)

    peaks = {"its object": 0, "the first object": 0, "the background": 0}
    ratios: dict[str, list[float]] = {"colour 1": [], "colour 2": [], "shape 1": [], "shape 2": []}
    for i, prompt in enumerate(prompts):
        objects = parse_caption(prompt).objects
        detected = score(images[i], prompt)["detected"]
        dets = [next((d for d in detected if d.color == o.color), None) for o in objects]
        if None in dets:
            continue
        words, maps = object_words(prompt), PromptMaps(tr, i, images.shape[1:3])
        top = int(np.argmax(maps.word_map(words[1]["color"]).numpy()))
        on_second, on_first = dets[1].mask.flat[top], dets[0].mask.flat[top]
        peaks["its object" if on_second else "the first object" if on_first else "the background"] += 1
        for k in (0, 1):
            for kind, name in (("color", "colour"), ("shape", "shape")):
                m, mask = maps.word_map(words[k][kind]).numpy(), dets[k].mask
                ratios[f"{name} {k + 1}"].append(float(m[mask].mean() / m[~mask].mean()))
    n = sum(peaks.values())
    print(f"model {args.model}: {n} two-object captions without positions, both objects found")
    print("peak of the second colour word's map: " + ", ".join(f"{v} on {k}" for k, v in peaks.items()))
    print("map's mean on its object / mean elsewhere (median): "
          + ", ".join(f"{k} {np.median(v):.2f}" for k, v in ratios.items()))

    def slots(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0].float()

    cos = torch.nn.functional.cosine_similarity
    two, one, other = slots("a red circle and a blue square"), slots("a blue square"), slots("a green triangle and a blue square")
    # slots: 0 start, 1 a, 2 red, 3 circle, 4 and, 5 a, 6 blue, 7 square; in "a blue square": 2 blue
    print(f"encoder slot of 'blue' as the second colour: cosine {cos(two[6], one[2], dim=0):.2f} with 'blue' as the "
          f"first, {cos(two[6], other[6], dim=0):.2f} with itself after another first object, "
          f"{cos(two[6], two[4], dim=0):.2f} with 'and', {cos(two[6], two[5], dim=0):.2f} with 'a'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

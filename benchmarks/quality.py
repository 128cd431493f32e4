"""How good is a shapes-world model? Prompt adherence and where its colour and shape words attend.

    python benchmarks/quality.py                          # the built-in model, 100 + 100 captions
    python benchmarks/quality.py --model runs/tiny --n 40 --json runs/tiny/quality.json
    python benchmarks/quality.py --kinds positioned,free,sized   # every caption kind of the world

For each caption kind (`--kinds`: "positioned", captions with positions as the world always had;
"free", captions without positions; "sized", every object with a size word, half of them with
positions) it draws N one-object and N two-object captions with held-out seeds (the training run's
data comes from other seeds), generates one image per caption at 25 steps and guidance 7.5 (one
seeded generator per caption, so the figures do not depend on the batch size), traces the
cross-attention with `sdlens.trace`, and measures:

- adherence: `sdlens.world.score` says every object's colour, shape, position and size is right
  (a position or size the caption does not give is not judged) and there are no extra objects
  ("all"); the parts are reported too.
- localisation, for the colour, shape, position and size word of each object (where it has one):
  * IoU: the word map (what `trace.word_map` gives: cross-attention of the word averaged over
    all steps, layers and heads, upsampled to 64x64) is min-max normalised to [0, 1] and
    thresholded at 0.5; IoU of that region with the object's true mask;
  * peak: how often the map's maximum lies on the object.
  The true mask is the *generated* image's own object: the analyzer's detected object of the
  caption object's colour (the largest blob of that colour). The model draws objects where it
  likes (within the position's region), so a mask rendered from the caption would be off by the
  position jitter; the detected blob is where the object really is. An object whose colour is
  not found in the image has no mask and is left out of the localisation figures (the tables
  say how many objects were measured).
  Reported separately for single objects, the first-named and the second-named object of
  two-object captions.
- attention mass: the share of the cross-attention probability (averaged over steps, layers,
  heads and pixels) that goes to the start slot, the caption's words, the end slot and the
  padding slots (and, for an SD 3-style model, the T5 slots, empty without T5). In a joint-attention
  model the pixels' attention is shared between text and image keys: the shares are of the text
  part, and "to text" says how much of the whole that part is (1 for a UNet's cross-attention).
- joint-attention models (SD 3-style): each word map also the other way round and both ways
  (`trace.word_map(..., direction=...)`): "text_image", where the word's own tokens attend in the
  image, and "both", where the pixels' and the word's maps agree (the geometric mean of the two,
  each min-max normalised); measured as the image->text maps are, and the targets judged for each.
  These traces also keep text->text attention (333 x 333 slots per layer and step), so captions go
  through the pipeline 10 at a time (`--batch` caps it lower, not higher).
- with `--concepts` (joint-attention models): the same images traced with ConceptAttention
  concepts (the world's colours and shapes, and "background"); each object's colour and shape
  concept maps measured as the word maps are, beside the raw image->text maps of the same words:
  ConceptAttention's output-space maps ("colour concept", "shape concept") and the concept tokens'
  own attention over the image (`concept_map(..., space="attention")`).
- with "free": where the noise puts the objects: the detected objects' centres over a 3x3 grid
  of the image (a model that ignores the noise piles them into a few cells).
- with "sized": whether size words are obeyed: for N one-object captions without positions, "a
  small ..." and "a big ..." from the same seed; obeyed when the small object's detected half-size
  is below the big one's.

It prints markdown tables; `--json OUT` saves every figure and the per-caption records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlens.analysis import JOINT_SLOT_KINDS, kind_shares, localisation  # noqa: E402  the measures sweeps record too
from sdlens.world import object_words  # noqa: E402  (colour_words.py imports it from here too)

EVAL_SEED = 2_000_000_007  # held out: training draws its data from seed * 1_000_003 + small offsets
WORD_KINDS = ("color", "shape", "position", "size")
CONCEPT_KINDS = ("color concept", "shape concept",  # --concepts: ConceptAttention maps of the same objects,
                 "color concept attention", "shape concept attention")  # and the concept tokens' own rows
DIRECTIONS = ("text_image", "both")  # joint models: word maps the other way round, and both ways (word_map's direction)
DIRECTION_KINDS = tuple(f"{kind}/{d}" for d in DIRECTIONS for kind in WORD_KINDS)
JOINT_BATCH = 10  # captions per call when text->image maps are traced (text->text maps are 333 x 333 per layer)
GROUPS = ("single", "first", "second")
CAPTION_KINDS = {  # sample_scene's settings for each caption kind
    "positioned": {},
    "free": {"free_prob": 1.0},
    "sized": {"free_prob": 0.5, "size_prob": 1.0},
}
TARGETS = {  # the shipped model's targets (issues 3 and 13); those whose figure a run lacks are skipped
    "adherence single": ("adherence", "single", 0.95, ">="),
    "adherence two": ("adherence", "two", 0.90, ">="),
    "shape IoU single": ("localisation", "single.shape.iou", 0.5, ">="),
    "colour peak first": ("localisation", "first.color.peak", 0.80, ">="),
    "shape peak first": ("localisation", "first.shape.peak", 0.80, ">="),
    "colour peak second": ("localisation", "second.color.peak", 0.80, ">="),
    "shape peak second": ("localisation", "second.shape.peak", 0.80, ">="),
    "size words obeyed": ("sizes", "obeyed", 0.90, ">="),
    "largest grid cell (free)": ("grid", "max_share", 1 / 3, "<="),
}


def eval_captions(n: int, seed: int = EVAL_SEED, kinds: tuple[str, ...] = ("positioned",)) -> list[tuple[str, int]]:
    """For each caption kind, n one-object then n two-object captions, each with its own generation seed."""
    from sdlens.world import caption, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        for n_objects in (1, 2):
            for _ in range(n):
                scene = sample_scene(rng, n_objects=n_objects, **CAPTION_KINDS[kind])
                out.append((caption(scene), int(rng.integers(0, 2**31))))
    return out


def caption_kind(scene) -> str:
    """Which kind of caption describes ``scene``."""
    if any(o.size for o in scene.objects):
        return "sized"
    return "positioned" if scene.positioned else "free"


class PromptMaps:
    """One prompt's cross-attention, averaged over steps and heads per layer, for fast word maps and slot shares.

    `word_map(i)` is what `trace.word_map(i, prompt_index=p, size=size)` computes (the mean of the word's
    slots, per layer at its own resolution, upsampled bilinearly, averaged over layers; checked
    against it once per batch), but it reduces each layer's (steps, heads) once per prompt
    instead of once per word.
    """

    def __init__(self, tr, prompt: int, size: tuple[int, int]) -> None:
        from sdlens.maps import agreement, average_upsampled

        self._average_upsampled, self._agreement = average_upsampled, agreement
        self.tokenization = tr.tokenization(prompt)
        self.size = size
        row = tr.row(prompt)
        # per layer: (h, w, keys), the mean over steps and heads
        self.layers = [tr.maps(layer)[:, row].float().mean(dim=(0, 1)) for layer in tr.layers_of("cross")]
        # joint models traced with text_attn: per layer (text slots, h, w), the mean over steps and heads
        self.text_layers = [tr.maps(layer, "text_image")[:, row].float().mean(dim=(0, 1))
                            for layer in (tr.layers_of("text_image") if "text_image" in tr.kinds else ())]

    def word_map(self, word: int, direction: str = "image_text") -> torch.Tensor:
        slots = self.tokenization.word_tokens[word]
        if direction == "both":
            return self._agreement(self.word_map(word), self.word_map(word, "text_image"))
        if direction == "text_image":
            return self._average_upsampled([m[slots].mean(0) for m in self.text_layers], self.size)  # (H, W)
        return self._average_upsampled([m[..., slots].mean(-1) for m in self.layers], self.size)  # (H, W)

    def slot_mass(self) -> dict[str, float]:
        """Share of cross-attention going to start / word / end / padding slots (and T5's, SD 3), and the
        share of the pixels' whole attention that goes to text ("to text": 1 for a UNet)."""
        mass = torch.stack([m.mean(dim=(0, 1)) for m in self.layers]).mean(0)  # (keys,)
        shares = kind_shares(mass, self.tokenization.kinds)
        out = {k: float(shares[k]) if k in shares else 0.0 for k in JOINT_SLOT_KINDS}
        out["to text"] = float(mass.sum())  # 1 for cross-attention; the text part of a joint softmax
        return out


def world_concepts() -> list[str]:
    """The concepts `--concepts` traces: every colour and shape word of the world, and "background"."""
    from sdlens.world import COLORS, SHAPES

    return [*COLORS, *SHAPES, "background"]


def evaluate(pipe, captions, *, steps: int, guidance: float, batch: int, device, concepts: bool = False) -> list[dict]:
    """Generate, score and measure every caption; one record per caption."""
    import sdlens
    from sdlens.world import parse_caption, score

    joint = getattr(pipe, "transformer", None) is not None  # SD 3-style: word maps both ways
    batch = min(batch, JOINT_BATCH) if joint else batch
    records = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        prompts = [c for c, _ in chunk]
        generators = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        with sdlens.trace(pipe, text_attn=joint, concepts=world_concepts() if concepts else None) as tr:
            images = pipe(
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
            ).images  # (n, 64, 64, 3) float in [0, 1]
        images = (images * 255).round().clip(0, 255).astype(np.uint8)
        size = images.shape[1:3]
        for i, (prompt, seed) in enumerate(chunk):
            scene = parse_caption(prompt)
            words = tr.words(prompt_index=i)
            if words != prompt.split():
                raise RuntimeError(f"the trace's words {words} are not the caption's {prompt.split()}")
            maps = PromptMaps(tr, i, size)
            indices = object_words(prompt)
            if i == 0:  # the shortcut computes what the trace computes
                for direction in ("image_text", *DIRECTIONS) if joint else ("image_text",):
                    reference = tr.word_map(indices[0]["shape"], prompt_index=i, size=size, direction=direction)
                    torch.testing.assert_close(maps.word_map(indices[0]["shape"], direction), reference,
                                               rtol=1e-3, atol=1e-6)
            result = score(images[i], scene)
            record = {
                "caption": prompt,
                "seed": seed,
                "kind": caption_kind(scene),
                "n_objects": len(scene.objects),
                **{k: bool(result[k]) for k in ("all", "color", "shape", "position", "size", "count")},
                "slot_mass": maps.slot_mass(),
                "objects": [],
            }
            for k, obj in enumerate(scene.objects):
                det = next((d for d in result["detected"] if d.color == obj.color), None)
                entry: dict = {
                    "group": "single" if len(scene.objects) == 1 else GROUPS[1 + k],
                    "found": det is not None,
                }
                if det is not None:
                    entry["centroid"] = [float(c) for c in det.centroid]
                    entry["radius"] = det.radius
                    for kind, index in indices[k].items():
                        entry[kind] = localisation(maps.word_map(index), det.mask)
                        for direction in DIRECTIONS if joint else ():
                            entry[f"{kind}/{direction}"] = localisation(maps.word_map(index, direction), det.mask)
                    if concepts:
                        for kind, word in (("color concept", obj.color), ("shape concept", obj.shape)):
                            entry[kind] = localisation(tr.concept_map(word, prompt_index=i, size=size), det.mask)
                            entry[f"{kind} attention"] = localisation(
                                tr.concept_map(word, prompt_index=i, size=size, space="attention"), det.mask)
                record["objects"].append(entry)
            records.append(record)
        print(f"  {min(start + batch, len(captions))}/{len(captions)} captions", file=sys.stderr)
    return records


def size_pairs(pipe, n: int, seed: int, *, steps: int, guidance: float, device) -> list[dict]:
    """n one-object captions without positions, drawn "small" and "big" from one seed: the detected
    half-size of each (None where the object's colour is not found)."""
    from sdlens.world import Obj, Scene, analyze, caption, sample_scene

    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(n):
        obj = sample_scene(rng, n_objects=1, free_prob=1.0).objects[0]
        s = int(rng.integers(0, 2**31))
        pair = {}
        for size in ("small", "big"):
            text = caption(Scene((Obj(obj.shape, obj.color, None, size),)))
            image = pipe(text, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                         generator=torch.Generator(device).manual_seed(s)).images[0]
            det = next((d for d in analyze((image * 255).round().astype(np.uint8)) if d.color == obj.color), None)
            pair[size] = None if det is None else det.radius
        out.append({"object": f"{obj.color} {obj.shape}", "seed": s, **pair})
    return out


def summarize(records: list[dict], pairs: list[dict] | None = None) -> dict:
    def mean(xs):
        return float(np.mean(xs)) if len(xs) else float("nan")

    summary: dict = {"adherence": {}, "parts": {}, "localisation": {}, "slot_mass": {}, "by_kind": {}}
    for name, n_obj in (("single", 1), ("two", 2)):
        rs = [r for r in records if r["n_objects"] == n_obj]
        summary["adherence"][name] = mean([r["all"] for r in rs])
        summary["parts"][name] = {
            k: mean([r[k] for r in rs]) for k in ("color", "shape", "position", "size", "count")
        }
        summary["parts"][name]["n"] = len(rs)
        summary["slot_mass"][name] = {
            k: mean([r["slot_mass"].get(k, 0.0 if k == "t5" else 1.0) for r in rs])
            for k in ("start", "word", "end", "pad", "t5", "to text")
        }
        for kind in CAPTION_KINDS:
            ks = [r for r in rs if r.get("kind", "positioned") == kind]
            if ks:
                summary["by_kind"].setdefault(kind, {})[name] = {"n": len(ks), "adherence": mean([r["all"] for r in ks])}
    def localise(rs: list[dict], group: str) -> dict:
        objs = [o for r in rs for o in r["objects"] if o["group"] == group]
        found = [o for o in objs if o["found"]]
        g = {"n": len(objs), "measured": len(found)}
        for kind in WORD_KINDS + CONCEPT_KINDS + DIRECTION_KINDS:
            have = [o[kind] for o in found if kind in o]
            g[kind] = {"iou": mean([x["iou"] for x in have]), "peak": mean([x["peak"] for x in have]), "n": len(have)}
        return g

    for group in GROUPS:
        summary["localisation"][group] = localise(records, group)
    for kind, k in summary["by_kind"].items():
        ks = [r for r in records if r.get("kind", "positioned") == kind]
        k["localisation"] = {group: localise(ks, group) for group in GROUPS}
    free = [o["centroid"] for r in records if r.get("kind") == "free" for o in r["objects"] if o["found"]]
    if free:
        cells = np.zeros((3, 3))
        for x, y in free:
            cells[min(int(y * 3), 2), min(int(x * 3), 2)] += 1
        shares = cells / cells.sum()
        summary["grid"] = {"n": len(free), "shares": shares.round(3).tolist(), "max_share": float(shares.max())}
    if pairs:
        both = [p for p in pairs if p["small"] is not None and p["big"] is not None]
        summary["sizes"] = {"n": len(pairs), "measured": len(both),
                            "obeyed": mean([p["small"] < p["big"] for p in both])}
    summary["targets"] = {}
    joint = any(summary["localisation"][g]["shape/both"]["n"] for g in GROUPS)
    for label, (section, key, goal, sense) in TARGETS.items():
        if section not in summary:
            continue
        # a word map's target is judged for each direction the run measured
        variants = [("", key)]
        if section == "localisation" and joint:
            group, kind, measure = key.split(".")
            variants = [(" [image->text]", key)] + [(f" [{d.replace('_', '->')}]", f"{group}.{kind}/{d}.{measure}")
                                                    for d in DIRECTIONS]
        for suffix, path in variants:
            value = summary[section]
            for part in path.split("."):
                value = value[part]
            met = value >= goal if sense == ">=" else value <= goal
            summary["targets"][label + suffix] = {"value": value, "goal": goal, "sense": sense, "met": bool(met)}
    return summary


def markdown(summary: dict) -> str:
    a, p = summary["adherence"], summary["parts"]
    lines = [
        "| captions | n | adherence | colour | shape | position | size | count |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("single", "two"):
        q = p[name]
        lines.append(
            f"| {name} | {q['n']} | {a[name]:.1%} | {q['color']:.1%} | {q['shape']:.1%} | {q['position']:.1%} "
            f"| {q['size']:.1%} | {q['count']:.1%} |"
        )
    if len(summary["by_kind"]) > 1:
        lines += ["", "| caption kind | adherence, one object | adherence, two objects |", "| --- | ---: | ---: |"]
        for kind, k in summary["by_kind"].items():
            lines.append(f"| {kind} | {k['single']['adherence']:.1%} ({k['single']['n']}) "
                         f"| {k['two']['adherence']:.1%} ({k['two']['n']}) |")
    lines += [
        "",
        "| object | measured / n | colour IoU | colour peak | shape IoU | shape peak | position IoU | position peak "
        "| size IoU | size peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def row(label: str, g: dict) -> str:
        cells = " | ".join(f"{g[k]['iou']:.2f} | {g[k]['peak']:.0%}" if g[k]["n"] else "– | –" for k in WORD_KINDS)
        return f"| {label} | {g['measured']} / {g['n']} | {cells} |"

    for group in GROUPS:
        lines.append(row(group, summary["localisation"][group]))
    if len(summary["by_kind"]) > 1:  # the same, per caption kind
        for kind, k in summary["by_kind"].items():
            lines += [row(f"{kind}: {group}", k["localisation"][group]) for group in GROUPS]
    if any(summary["localisation"][g]["shape/both"]["n"] for g in GROUPS):
        lines += ["", "Word maps read both ways (joint attention): image->text (the pixels' attention to the word), "
                  "text->image (the word's attention over the image) and both (where the two agree):", "",
                  "| object | colour IoU i->t / t->i / both | colour peak i->t / t->i / both "
                  "| shape IoU i->t / t->i / both | shape peak i->t / t->i / both |", "| --- | ---: | ---: | ---: | ---: |"]
        groups = [(group, summary["localisation"][group]) for group in GROUPS]
        if len(summary["by_kind"]) > 1:
            groups += [(f"{kind}: {group}", k["localisation"][group]) for kind, k in summary["by_kind"].items()
                       for group in GROUPS]
        for label, g in groups:
            cells = []
            for word in ("color", "shape"):
                three = [g[word], g[f"{word}/text_image"], g[f"{word}/both"]]
                cells += [" / ".join(f"{x['iou']:.2f}" for x in three), " / ".join(f"{x['peak']:.0%}" for x in three)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(summary["localisation"][g]["color concept"]["n"] for g in GROUPS):
        lines += ["", "Raw image->text maps against concept maps, on the same images: ConceptAttention's (output "
                  "space) and the concept tokens' own attention over the image (attention space):", "",
                  "| object | colour IoU raw / output / attention | colour peak raw / output / attention "
                  "| shape IoU raw / output / attention | shape peak raw / output / attention |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for group in GROUPS:
            g = summary["localisation"][group]
            cells = []
            for word in ("color", "shape"):
                three = [g[word], g[f"{word} concept"], g[f"{word} concept attention"]]
                cells += [" / ".join(f"{x['iou']:.2f}" for x in three), " / ".join(f"{x['peak']:.0%}" for x in three)]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    if "grid" in summary:
        rows = summary["grid"]["shares"]
        lines += ["", f"Object centres for captions without positions ({summary['grid']['n']} objects), "
                  "share per cell of a 3x3 grid of the image:", "", "| | left | middle | right |", "| --- | ---: | ---: | ---: |"]
        for name, row in zip(("top", "middle", "bottom"), rows):
            lines.append(f"| {name} | " + " | ".join(f"{v:.0%}" for v in row) + " |")
    if "sizes" in summary:
        s = summary["sizes"]
        lines += ["", f"Size words: the small object below the big one from the same seed in {s['obeyed']:.0%} "
                  f"of {s['measured']} pairs measured ({s['n']} drawn)."]
    lines += [
        "",
        "| captions | start slot | words | end slot | padding | T5 slots | to text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("single", "two"):
        m = summary["slot_mass"][name]
        lines.append(f"| {name} | {m['start']:.1%} | {m['word']:.1%} | {m['end']:.1%} | {m['pad']:.1%} "
                     f"| {m['t5']:.1%} | {m['to text']:.1%} |")
    lines += ["", "| target | value | goal | met |", "| --- | ---: | ---: | --- |"]
    for label, t in summary["targets"].items():
        lines.append(f"| {label} | {t['value']:.2f} | {t['sense']} {t['goal']:.2f} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or 'tiny-sd3' (built in) or a pipeline folder")
    parser.add_argument("--n", type=int, default=100, help="captions of each kind (one-object, two-object)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=50, help="captions per pipeline call")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out seed for captions and noise")
    parser.add_argument("--kinds", default="positioned",
                        help=f"caption kinds, comma-separated, of: {', '.join(CAPTION_KINDS)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--concepts", action="store_true",
                        help="joint-attention models: also measure ConceptAttention maps of the same objects")
    parser.add_argument(
        "--json", default=None, metavar="OUT", help="save the figures (and per-caption records)"
    )
    args = parser.parse_args(argv)

    from sdlens.models import load_pipeline

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in CAPTION_KINDS]
    if bad or not kinds:
        parser.error(f"--kinds {args.kinds!r}: choose from {', '.join(CAPTION_KINDS)}")
    pipe = load_pipeline(args.model, device=args.device)
    device = pipe.device
    captions = eval_captions(args.n, args.seed, kinds)
    started = time.time()
    records = evaluate(
        pipe, captions, steps=args.steps, guidance=args.guidance, batch=args.batch, device=device,
        concepts=args.concepts,
    )
    pairs = None
    if "sized" in kinds:
        pairs = size_pairs(pipe, args.n, args.seed, steps=args.steps, guidance=args.guidance, device=device)
    summary = summarize(records, pairs)
    summary["setup"] = {
        "model": str(args.model),
        "n_per_kind": args.n,
        "kinds": list(kinds),
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "concepts": world_concepts() if args.concepts else None,
        "threshold": "word map min-max normalised, thresholded at 0.5",
        "true_mask": "the generated image's detected object of the caption object's colour",
    }
    print(f"model {args.model}: {args.n} + {args.n} captions of each kind ({', '.join(kinds)}), {args.steps} steps, "
          f"guidance {args.guidance}\n")
    print(markdown(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records, "size_pairs": pairs},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

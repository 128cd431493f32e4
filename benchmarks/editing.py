"""Does an attention edit work, and does it keep the rest of the picture? Measured on the shapes world.

    python benchmarks/editing.py                    # the built-in model, 20 scenes per edit type
    python benchmarks/editing.py --n 40 --json runs/editing.json
    python benchmarks/editing.py --types colour-1-free,real-colour --methods replace,replace+blend

Held-out scenes (their own seed; each edit type draws its scenes from its own stream, so a run of
some types edits the same scenes as a run of all), each edited from one seeded starting noise at 25
steps and guidance 7.5. Edit types:

- ``colour-1-pos`` / ``colour-1-free``: one object, its colour swapped (captions with / without
  positions); ``shape-1-pos`` / ``shape-1-free``: its shape swapped;
- ``colour-2-pos`` / ``colour-2-free``: two objects, one of them (first or second, alternately)
  gets a colour neither had;
- ``refine-add``: a one-object caption without positions gets a second object ("… and a blue
  square"), by ``sdlens.edit.refine``;
- ``size-up`` / ``size-down``: "a big …" with the attention of "big" scaled by 10 / -8
  (``sdlens.edit.reweight``): the object must grow / shrink (the built-in model's text encoder
  carries most of a size word into the following slots, so its own slot needs large factors);
- ``real-colour``: a rendered scene (not generated: the renderer's exact picture) DDIM-inverted,
  its colour swapped; ``real-colour-null``: the same scenes, null-text inverted (each scene is
  inverted once, and every method edits that inversion).

Methods (for the swaps; refine-add and the size edits use their own call, with and without blend):

- ``regenerate``: the target prompt from the same noise, no attention edit (cross_window=0,
  self_window=0): the baseline every attention method must beat on structure;
- ``replace``: Prompt-to-Prompt's word swap (``sdlens.edit.replace`` with its defaults);
- ``inject_self``: Free-Prompt-Editing (``sdlens.edit.inject_self`` with its defaults);
- each ``+blend``: with a local blend on the edited object's words.

Measures, over the scenes whose base image shows its caption (``sdlens.world.score``):

- success: the edited image shows the target caption (every object's colour, shape, position where
  given, and no extra object); for the size edits: the object's area moved the right way by ≥ 10%;
- IoU: the edited object's mask in the edited image against its mask in the base image (for a
  real image: against the true mask of the rendered scene);
- kept (two objects): the untouched object keeps its colour and shape and a mask IoU ≥ 0.9;
- reconstruction (real images): the base branch's reconstruction shows the scene's caption; its
  error: the mean absolute pixel difference (0..1) between the reconstruction and the scene;
- time: seconds per edit against a plain generation of the same two-prompt batch.

Targets (issue 15) are printed beneath the tables.

On an SD 3-style model (``--model tiny-sd3``: joint attention, flow matching) the edits act on the
image->text part of the joint attention; the real-image types (DDIM inversion) and the
self-attention injection methods are UNet-only and left out by default (asked for, they are refused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

EDIT_SEED = 1_500_000_001  # held out from training's seeds, and from quality.py's
TYPES = ("colour-1-pos", "colour-1-free", "shape-1-pos", "shape-1-free", "colour-2-pos", "colour-2-free",
         "refine-add", "size-up", "size-down", "real-colour", "real-colour-null")
METHODS = ("regenerate", "regenerate+blend", "replace", "replace+blend", "inject_self", "inject_self+blend")


def as_uint8(image) -> np.ndarray:
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def cases(kind: str, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` edit cases of one type: base and target scenes, the edited object, a seed."""
    from sdlens.world import COLORS, SHAPES, Obj, Scene, sample_scene

    out = []
    for i in range(n):
        seed = int(rng.integers(0, 2**31))
        two = kind.startswith("colour-2")
        free = kind.endswith("free") or kind in ("refine-add", "size-up", "size-down")
        scene = sample_scene(rng, n_objects=2 if two else 1, free_prob=1.0 if free else 0.0)
        objs = list(scene.objects)
        k = i % 2 if two else 0
        o = objs[k]
        if kind.startswith("colour") or kind == "real-colour":
            new = str(rng.choice([c for c in COLORS if c not in {x.color for x in objs}]))
            target_obj = Obj(o.shape, new, o.position)
        elif kind.startswith("shape"):
            target_obj = Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.position)
        elif kind == "refine-add":
            other = Obj(str(rng.choice(SHAPES)), str(rng.choice([c for c in COLORS if c != o.color])))
            out.append({"base": Scene((o,)), "target": Scene((o, other)), "object": 0, "seed": seed})
            continue
        else:  # size edits: "a big ..." reweighted
            big = Obj(o.shape, o.color, None, "big")
            out.append({"base": Scene((big,)), "target": Scene((big,)), "object": 0, "seed": seed,
                        "factor": 10.0 if kind == "size-up" else -8.0})
            continue
        target = objs.copy()
        target[k] = target_obj
        out.append({"base": Scene(tuple(objs)), "target": Scene(tuple(target)), "object": k, "seed": seed})
    return out


def blend_words(case: dict) -> list[str]:
    """The edited object's words in either prompt: its shape, and the colour or shape that changes."""
    a, b = case["base"].objects[case["object"]], case["target"].objects[case["object"]]
    return sorted({a.shape, b.shape} | ({a.color, b.color} if a.color != b.color else set()))


def run_case(pipe, kind: str, method: str, case: dict, steps: int, guidance: float, image=None):
    from sdlens import edit
    from sdlens.world import caption

    base, target = caption(case["base"]), caption(case["target"])
    kw = {"seed": case["seed"], "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    if image is not None:
        kw["image"] = image
    blend = {"words": blend_words(case)} if method.endswith("+blend") else None
    name = method.removesuffix("+blend")
    if kind == "refine-add":
        return edit.refine(pipe, base, target, blend=blend, **kw)
    if kind.startswith("size"):
        return edit.reweight(pipe, base, {"big": case["factor"]}, blend=blend, **kw)
    if name == "regenerate":
        return edit.replace(pipe, base, target, cross_window=0, self_window=0, blend=blend, **kw)
    if name == "replace":
        return edit.replace(pipe, base, target, blend=blend, **kw)
    return edit.inject_self(pipe, base, target, blend=blend, **kw)


def invert_case(pipe, kind: str, case: dict, steps: int, guidance: float):
    """The rendered base scene of a real-image case, inverted (``-null``: null-text), and its true masks."""
    from sdlens import edit
    from sdlens.world import caption, render

    scene = render(case["base"], size=64, seed=case["seed"] % 1000)
    h, w = scene.image.shape[:2]
    f = pipe.vae_scale_factor
    inversion = edit.invert(pipe, scene.image, caption(case["base"]), (h // f, w // f), num_inference_steps=steps,
                            guidance_scale=guidance, inversion="null-text" if kind.endswith("-null") else "ddim")
    return inversion, list(scene.masks)


def find(detected, obj):
    return next((d for d in detected if d.color == obj.color), None)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    from sdlens.world import mask_iou

    return mask_iou(a, b)


def measure(kind: str, case: dict, result, truth=None) -> dict | None:
    """One edit's record; None when the base image does not show its caption (nothing to preserve)."""
    from sdlens.world import analyze, score

    base_img, edit_img = as_uint8(result.images[0]), as_uint8(result.images[1])
    base_score = score(base_img, case["base"])
    rec: dict = {"base_ok": bool(base_score["all"])}
    if kind.startswith("real-colour"):
        rec["reconstruction"] = rec["base_ok"]
        rec["reconstruction_error"] = result.reconstruction_error
    elif not rec["base_ok"]:
        return None
    k = case["object"]
    before = find(base_score["detected"], case["base"].objects[k]) if truth is None else None
    if kind.startswith("size"):
        after = find(analyze(edit_img), case["base"].objects[k])
        grew = after is not None and before is not None and after.area >= 1.1 * before.area
        shrank = after is not None and before is not None and after.area <= 0.9 * before.area
        rec["success"] = bool(grew if kind == "size-up" else shrank)
        rec["area_ratio"] = None if after is None else float(after.area / before.area)
        rec["iou"] = None if after is None else iou(after.mask, before.mask)  # a grown object still overlaps
        return rec
    edited = score(edit_img, case["target"])
    rec["success"] = bool(edited["all"])
    after = find(edited["detected"], case["target"].objects[k])
    reference = truth[k] if truth is not None else (before.mask if before is not None else None)
    rec["iou"] = None if after is None or reference is None else iou(after.mask, reference)
    if len(case["base"].objects) == 2 and kind != "refine-add":
        other = case["base"].objects[1 - k]
        was, now = find(base_score["detected"], other), find(edited["detected"], other)
        rec["kept"] = bool(was is not None and now is not None and now.shape == was.shape
                           and iou(now.mask, was.mask) >= 0.9)
    return rec


def evaluate(pipe, types, methods, n: int, steps: int, guidance: float, seed: int) -> dict:
    results: dict = {}
    for kind in types:
        real = kind.startswith("real-colour")
        stream = TYPES.index("real-colour" if real else kind)  # the -null variant edits the same scenes
        kind_cases = cases("real-colour" if real else kind, n, np.random.default_rng([seed, stream]))
        inversions = [invert_case(pipe, kind, case, steps, guidance) for case in kind_cases] if real else None
        kind_methods = ([m for m in methods if m.startswith("replace")] or ["replace"]) \
            if kind in ("refine-add", "size-up", "size-down") else methods
        for method in kind_methods:
            label = method if kind not in ("refine-add", "size-up", "size-down") else \
                ("refine" if kind == "refine-add" else "reweight") + ("+blend" if method.endswith("+blend") else "")
            records = []
            for i, case in enumerate(kind_cases):
                image = truth = None
                if real:
                    image, truth = inversions[i]
                result = run_case(pipe, kind, method, case, steps, guidance, image=image)
                rec = measure(kind, case, result, truth)
                if rec is not None:
                    records.append(rec)
            results[(kind, label)] = records
            summary = summarize(records)
            print(f"  {kind:<14} {label:<18} " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return results


def summarize(records: list[dict]) -> dict:
    def mean(key):
        vals = [r[key] for r in records if r.get(key) is not None]
        return None if not vals else round(float(np.mean(vals)), 3)

    out = {"n": len(records), "success": mean("success"), "iou": mean("iou")}
    if any("kept" in r for r in records):
        out["kept"] = mean("kept")
    if any("reconstruction" in r for r in records):
        out["reconstruction"] = mean("reconstruction")
        out["reconstruction_error"] = mean("reconstruction_error")
    if any("area_ratio" in r for r in records):
        out["area_ratio"] = mean("area_ratio")
    return out


def timing(pipe, steps: int, guidance: float, repeats: int = 3) -> dict:
    """Seconds per edit (replace with blend, the most work) against a plain two-prompt generation."""
    from sdlens import edit

    prompts = ("a red circle on the left and a blue square on the right",
               "a green circle on the left and a blue square on the right")
    kw = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    pipe(list(prompts), **kw)  # warm-up
    t_plain, t_edit = [], []
    for r in range(repeats):
        start = time.perf_counter()
        pipe(list(prompts), generator=torch.Generator("cpu").manual_seed(r), **kw)
        t_plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        edit.replace(pipe, *prompts, seed=r, blend="circle", **kw)
        t_edit.append(time.perf_counter() - start)
    plain, edited = float(np.median(t_plain)), float(np.median(t_edit))
    return {"plain_s": round(plain, 3), "edit_s": round(edited, 3), "ratio": round(edited / plain, 3)}


def markdown(results: dict, times: dict) -> str:
    lines = ["| edit | method | scenes | success | IoU | other kept | reconstruction | its error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (kind, label), records in results.items():
        s = summarize(records)

        def pct(x):
            return "–" if x is None else f"{x:.0%}"

        lines.append(f"| {kind} | {label} | {s['n']} | {pct(s['success'])} | "
                     f"{'–' if s['iou'] is None else format(s['iou'], '.2f')} | {pct(s.get('kept'))} | "
                     f"{pct(s.get('reconstruction'))} | "
                     f"{'–' if s.get('reconstruction_error') is None else format(s['reconstruction_error'], '.4f')} |")
    lines += ["", f"time per edit (replace + blend, 2 prompts): {times['edit_s']:.2f} s against "
              f"{times['plain_s']:.2f} s for a plain generation of the same batch: {times['ratio']:.2f}×"]
    return "\n".join(lines)


def targets(results: dict, times: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 15's targets: (what, met, the figures); a target on an edit type is met when some
    attention method meets it (named), else the figures of the one that comes closest are shown."""
    def summary(kind, label):
        return summarize(results[(kind, label)])

    def attention_methods(kind):
        return [label for k, label in results if k == kind and not label.startswith("regenerate")]

    def check(what, kind, ok, closeness, figures):
        labels = attention_methods(kind)
        if not labels:
            return []
        meeting = [label for label in labels if ok(summary(kind, label))]
        best = meeting[0] if meeting else max(labels, key=lambda label: closeness(summary(kind, label)))
        return [(f"{what} ({best})", bool(meeting), figures(summary(kind, best)))]

    out = []
    for kind in ("colour-1-pos", "colour-1-free"):
        out += check(f"{kind}: success ≥ 90% with IoU ≥ 0.9", kind,
                     lambda s: (s["success"] or 0) >= 0.9 and (s["iou"] or 0) >= 0.9,
                     lambda s: min(s["success"] or 0, (s["iou"] or 0) + 0.0),
                     lambda s: f"success {s['success']}, IoU {s['iou']}")
    for kind in ("colour-2-pos", "colour-2-free"):
        out += check(f"{kind}: success ≥ 85%, other kept ≥ 90%", kind,
                     lambda s: (s["success"] or 0) >= 0.85 and (s.get("kept") or 0) >= 0.9,
                     lambda s: min(s["success"] or 0, s.get("kept") or 0),
                     lambda s: f"success {s['success']}, kept {s.get('kept')}")
    for kind in ("real-colour", "real-colour-null"):
        out += check(f"{kind}: success ≥ 80%, IoU with the true mask ≥ 0.8, reconstruction ≥ 85%", kind,
                     lambda s: (s["success"] or 0) >= 0.8 and (s["iou"] or 0) >= 0.8 and (s.get("reconstruction") or 0) >= 0.85,
                     lambda s: min(s["success"] or 0, s["iou"] or 0, s.get("reconstruction") or 0),
                     lambda s: f"success {s['success']}, IoU {s['iou']}, reconstruction {s.get('reconstruction')}, "
                               f"mean error {s.get('reconstruction_error')}")
    for kind in dict.fromkeys(k for k, _ in results):
        if (kind, "regenerate") not in results:
            continue
        base = summary(kind, "regenerate")
        for label in attention_methods(kind):
            s = summary(kind, label)
            if base["iou"] is not None and s["iou"] is not None:
                out.append((f"{kind}: {label} keeps structure better than regenerate", s["iou"] > base["iou"],
                            f"IoU {s['iou']} vs {base['iou']}"))
    out.append(("an edit costs ≤ 1.3× a plain generation of the same batch", times["ratio"] <= 1.3, f"{times['ratio']}×"))
    return out


def is_joint(model: str) -> bool:
    """The model's denoiser is a joint-attention transformer (SD 3 family), read from its folder's index."""
    from sdlens.models import BUILTIN

    folder = BUILTIN.get(model, Path(model))
    index = folder / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name", "").startswith("StableDiffusion3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or 'tiny-sd3' (built in) or a pipeline folder")
    parser.add_argument("--n", type=int, default=20, help="scenes per edit type")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=EDIT_SEED)
    parser.add_argument("--types", default=None, help=f"edit types, comma-separated, of: {', '.join(TYPES)} "
                        "(default: all; on an SD 3-style model all but the real-image ones)")
    parser.add_argument("--methods", default=None, help=f"methods, of: {', '.join(METHODS)} "
                        "(default: all; on an SD 3-style model all but inject_self)")
    parser.add_argument("--json", default=None, metavar="OUT", help="save the figures and per-edit records")
    parser.add_argument("--report", default=None, metavar="JSON", help="print the tables of a saved --json run")
    args = parser.parse_args(argv)
    joint = args.report is None and is_joint(args.model)
    unet_only_types = [t for t in TYPES if t.startswith("real-")]
    unet_only_methods = [m for m in METHODS if m.startswith("inject_self")]
    types = [t.strip() for t in (args.types or ",".join(TYPES)).split(",") if t.strip()]
    methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    bad = [t for t in types if t not in TYPES] + [m for m in methods if m not in METHODS]
    if bad or not types or not methods:
        parser.error(f"unknown {bad}: --types from {', '.join(TYPES)}; --methods from {', '.join(METHODS)}")
    if joint:
        asked = [t for t in types if t in unet_only_types and args.types] + \
            [m for m in methods if m in unet_only_methods and args.methods]
        if asked:
            parser.error(f"{asked} need a UNet (DDIM inversion, self-attention layers); {args.model} is an SD 3-style "
                         "joint-attention model")
        types = [t for t in types if t not in unet_only_types]
        methods = [m for m in methods if m not in unet_only_methods]

    if args.report:
        saved = json.loads(Path(args.report).read_text())
        results = {tuple(key.split(" | ")): v["records"] for key, v in saved["results"].items()}
        print(markdown(results, saved["time"]) + "\n")
        for what, met, figures in targets(results, saved["time"]):
            print(f"- [{'x' if met else ' '}] {what}: {figures}")
        return 0

    import sdlens

    pipe = sdlens.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    started = time.time()
    print(f"model {args.model}: {args.n} scenes per edit type, {args.steps} steps, guidance {args.guidance}")
    results = evaluate(pipe, types, methods, args.n, args.steps, args.guidance, args.seed)
    times = timing(pipe, args.steps, args.guidance)
    print()
    print(markdown(results, times))
    print()
    for what, met, figures in targets(results, times):
        print(f"- [{'x' if met else ' '}] {what}: {figures}")
    print(f"\n({time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "setup": vars(args), "time": times,
            "results": {f"{k} | {m}": {"summary": summarize(r), "records": r} for (k, m), r in results.items()}},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

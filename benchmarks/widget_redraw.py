"""How fast the explorers redraw: median time from a control change to the new PNG, on the CPU.

    python benchmarks/widget_redraw.py                       # the built-in model (random weights if absent)
    python benchmarks/widget_redraw.py --model runs/tiny --steps 25 --repeats 40

Traces one 64x64 generation of the built-in model (25 steps, cross- and self-attention, all
heads, and the denoising previews when `sdlens.trace` can record them), then, for each explorer
and control, sets the control to each of up to `--repeats` values, each value once, so that
every redraw shows a picture not shown before (its map is computed from the trace; what does
not depend on the control, such as the prompt's total attention mass for the word's share, stays
cached, as in use; `--cold` empties the cache before every change), and prints the median and 90th-percentile wall time of the redraw it causes.
Target: a median of at most 50 ms.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
import warnings

import torch


def build_pipeline(model: str):
    """The built-in model, or (when its weights are not installed) the same architecture with random weights."""
    import sdlens
    from sdlens.models.load import TINY_DIR

    if model != "tiny" or (TINY_DIR / "model_index.json").exists():
        return sdlens.load_pipeline(model, device="cpu", progress=False), model
    from diffusers import StableDiffusionPipeline

    from sdlens.models import configs
    from sdlens.tokens import load_clip_tokenizer

    cfg = configs.TinyConfig()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=configs.build_vae(cfg),
        text_encoder=configs.build_text_encoder(cfg),
        tokenizer=load_clip_tokenizer(),
        unet=configs.build_unet(cfg),
        scheduler=configs.build_sampler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, "built-in architecture, random weights"


def make_trace(pipe, prompt: str, steps: int):
    import sdlens

    kw = dict(self_attn=True, heads="all")
    if "record_latents" in inspect.signature(sdlens.trace).parameters:
        kw["record_latents"] = True
    with sdlens.trace(pipe, **kw) as tr:
        image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images[0]
    if getattr(tr, "x0_images", None) is None:  # previews not recorded by this sdlens: stand-ins of the right shape
        n, rows = len(tr.steps), len(tr.rows)
        h, w = tr.image_size
        g = torch.Generator().manual_seed(0)
        tr.xt_images = torch.randint(0, 256, (n, rows, h, w, 3), dtype=torch.uint8, generator=g)
        tr.x0_images = torch.randint(0, 256, (n, rows, h, w, 3), dtype=torch.uint8, generator=g)
        tr.noise_levels = torch.linspace(14.6, 0.03, n).tolist()
    return tr, image


def time_control(explorer, name: str, values, repeats: int, cold: bool) -> list[float]:
    """Redraw times of setting control ``name`` to each of ``values`` in turn (at most ``repeats``)."""
    w = explorer.controls[name]
    times = []
    for v in values[:repeats]:
        if w.value == v:
            continue
        if cold:
            explorer.clear_cache()
        start = time.perf_counter()
        w.value = v  # the observer redraws synchronously
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cold", action="store_true",
                        help="empty the explorer's cache before every change (also of the values that do not "
                             "depend on the control changed, such as the prompt's total attention mass)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from sdlens.widgets import AttentionExplorer, DenoisingExplorer, SelfAttentionExplorer
    from sdlens.widgets.base import layer_options

    pipe, what = build_pipeline(args.model)
    tr, image = make_trace(pipe, args.prompt, args.steps)
    print(f"{what}: {tr}")

    att = AttentionExplorer(tr, image)
    slf = SelfAttentionExplorer(tr, image)
    den = DenoisingExplorer(tr)
    steps = list(tr.steps)
    h, w = tr.image_size
    cases = [
        ("AttentionExplorer", att, "word", [v for _, v in att.controls["word"].options]),
        ("AttentionExplorer", att, "step", steps),
        ("AttentionExplorer", att, "all_steps", [True, False] * args.repeats),
        ("AttentionExplorer", att, "layers", [v for _, v in layer_options(tr, "cross")]),
        ("AttentionExplorer", att, "head", []),
        ("AttentionExplorer", att, "alpha", [round(0.05 + 0.03 * i, 2) for i in range(args.repeats)]),
        ("SelfAttentionExplorer", slf, "y", list(range(0, h, 3))),
        ("SelfAttentionExplorer", slf, "x", list(range(0, w, 3))),
        ("SelfAttentionExplorer", slf, "step", steps),
        ("SelfAttentionExplorer", slf, "layers", [v for _, v in layer_options(tr, "self")]),
        ("SelfAttentionExplorer", slf, "head", []),
        ("DenoisingExplorer", den, "step", steps),
    ]
    print(f"{'explorer':<22} {'control':<10} {'median':>9} {'p90':>9} {'n':>4}")
    worst = 0.0
    for label, ex, name, values in cases:
        if name == "step" and "all_steps" in ex.controls:
            ex.controls["all_steps"].value = False
        if name == "head" and tr.head_indices:  # the layer with the most heads, so there are heads to switch
            kind = "self" if ex is slf else "cross"
            ex.controls["layers"].value = max(tr.layers_of(kind), key=lambda n: len(tr.head_indices[n]))
            values = [v for _, v in ex.controls["head"].options]
        t = time_control(ex, name, values, args.repeats, args.cold or name == "all_steps")  # 2 values: always cold
        if not t:
            continue
        med = statistics.median(t)
        p90 = sorted(t)[max(0, math.ceil(0.9 * len(t)) - 1)]
        worst = max(worst, med)
        print(f"{label:<22} {name:<10} {med * 1000:7.1f} ms {p90 * 1000:6.1f} ms {len(t):4d}")
    print(f"slowest median {worst * 1000:.1f} ms; target <= 50 ms: {'met' if worst <= 0.05 else 'NOT met'}"
          f" ({torch.get_num_threads()} torch threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

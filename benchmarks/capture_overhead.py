"""Time of a traced generation over an untraced one, and the bytes the trace keeps.

The model has Stable Diffusion 1.5's UNet layout (16 cross-attention layers, 8 heads, 768-d
context), random weights. On the CPU a reduced width and latent keep the run short; with
``--full`` (meant for a GPU) it is the full-size SD 1.5 UNet at 512 px, 50 steps, fp16.

    python benchmarks/capture_overhead.py                       # CPU: width 64, 256 px, 10 steps
    python benchmarks/capture_overhead.py --full --device cuda  # GPU: SD 1.5 UNet, 512 px, 50 steps

    python benchmarks/capture_overhead.py --width 8 --size 64 --steps 20   # dispatch-bound
    python benchmarks/capture_overhead.py --model flux          # Flux.1's 19 double + 38 single blocks

The last one makes the model so small that Python and op dispatch, not arithmetic, set the time:
a proxy for a GPU run whose kernels are fast (our guess at why the full-size fp16 run on an H100
showed more overhead than the CPU runs do; see notes/tiny_model.md).

``--model flux``: Flux.1's block layout (19 double-stream, 38 single-stream blocks, rotary positions,
attention through diffusers' dispatcher) at reduced width (4 heads of 16), random weights, 128-slot
text, guidance distilled (one row, no CFG batch); ``--size`` pixels with the stand-in VAE's factor 2,
so 128 px is a 32×32 grid of image tokens.

Traced = cross-attention of all layers and all steps, heads averaged, conditional half, fp16 on the
CPU (sdlens' defaults); on Flux every double- and single-stream block. Timings are the median of ``--repeats`` alternating runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sdlens
from sdlens.models.families import flux, sd15_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd15", "flux"), default="sd15",
                    help="sd15: SD 1.5's UNet layout; flux: Flux.1's transformer layout (reduced width)")
    ap.add_argument("--full", action="store_true", help="full-size SD 1.5 UNet at 512 px, 50 steps, fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=64, help="first block width (SD 1.5: 320)")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels (sd15: latent = size / 8, default 256; flux: default 128)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.full:
        args.width, args.size, args.steps = 320, 512, 50
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32

    args.size = args.size or (128 if args.model == "flux" else 256)
    extra = {}
    if args.model == "flux":
        pipe = flux(layers=19, single_layers=38, heads=4, head_dim=16).to(args.device, dtype)
        extra = {"max_sequence_length": 128}
        n_params = sum(p.numel() for p in pipe.transformer.parameters())
        what = f"Flux.1 transformer layout, 19 + 38 blocks, 4 heads of 16 ({n_params / 1e6:.1f} M parameters)"
        grid = args.size // pipe.vae_scale_factor // 2
        what += f", {args.size} px = {grid}×{grid} image tokens, 128 text slots, one row (guidance distilled)"
    else:
        pipe = sd15_layout(width=args.width, sample_size=args.size // 8).to(args.device, dtype)
        n_params = sum(p.numel() for p in pipe.unet.parameters())
        what = (f"SD 1.5 UNet layout, width {args.width} ({n_params / 1e6:.0f} M parameters), {args.size} px, "
                "CFG batch 2")

    def generate():
        g = torch.Generator(args.device).manual_seed(0)
        pipe("a red circle on the left", num_inference_steps=args.steps, height=args.size, width=args.size,
             generator=g, output_type="latent", **extra)
        if cuda:
            torch.cuda.synchronize()

    gpu_peak = {}  # traced? -> the run's peak GPU memory above what it started with
    tr_layers: list[str] = []

    def timed(traced: bool) -> tuple[float, int]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if traced:
            with sdlens.trace(pipe) as tr:
                generate()
            nbytes = tr.nbytes
            tr_layers[:] = tr.layers_of("cross")
        else:
            generate()
            nbytes = 0
        elapsed = time.perf_counter() - t0
        if cuda:
            gpu_peak[traced] = torch.cuda.max_memory_allocated() - start
        return elapsed, nbytes

    timed(False)
    timed(True)  # warm-up both paths
    plain, traced = [], []
    for _ in range(args.repeats):
        plain.append(timed(False)[0])
        t, nbytes = timed(True)
        traced.append(t)
    p, t = statistics.median(plain), statistics.median(traced)
    print(f"model: {what}, {args.steps} steps, {str(dtype).removeprefix('torch.')}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"untraced: {p:.3f} s   traced: {t:.3f} s   (median of {args.repeats})")
    print(f"ratio traced/untraced: {t / p:.3f}")
    print(f"bytes kept by the trace: {nbytes} ({nbytes / 1e6:.1f} MB, {len(tr_layers)} layers)")
    if cuda:  # the maps go to pinned host memory step by step: GPU memory should not grow with the trace
        print(f"peak GPU memory of a run: untraced {gpu_peak[False] / 1e6:.1f} MB, traced {gpu_peak[True] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

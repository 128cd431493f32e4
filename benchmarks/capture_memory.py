"""Peak memory a trace costs, against the bytes it keeps.

Each mode runs in a fresh process: the same generation untraced and traced, with the process's peak
resident memory (``ru_maxrss``) read after the run, less its resident memory just before it. The
extra peak of the traced run over the untraced one is what tracing cost at its worst moment: the
kept maps (held once: storage is allocated for all steps at the first one) plus the working memory
of one layer's float32 softmax, which query chunking bounds and which does not grow with the
number of steps. So ``extra peak / bytes kept`` tends to 1 as the trace grows (it was 2.2-2.5 when
per-step pieces were stacked at the end, and the full-head map of a large layer was made at once).

Resident memory also holds what the C allocator keeps after a free: glibc raises its mmap threshold
after large frees, and then keeps up to twice that (64 MiB) of freed heap before giving it back.
That part depends on the order of allocations, not on what is alive; ``--fixed-mmap-threshold``
takes it out of the figure.

    python benchmarks/capture_memory.py                     # self + cross attention, SD 1.5 layout
    python benchmarks/capture_memory.py --size 256 --steps 20 --no-self

The model has Stable Diffusion 1.5's UNet layout at a reduced width (random weights), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> None:
    import torch

    import sdlens
    from sdlens.models.families import sd15_layout

    torch.set_num_threads(1)  # steadier figures; the benchmark is about memory
    pipe = sd15_layout(width=args.width, sample_size=args.size // 8)

    def generate():
        pipe("a red circle on the left", num_inference_steps=args.steps, height=args.size, width=args.size,
             generator=torch.Generator().manual_seed(0), output_type="latent")

    generate()  # warm-up: allocator pools and lazily built state are in place before measuring
    before = rss_bytes()
    nbytes = 0
    if args.mode == "traced":
        with sdlens.trace(pipe, self_attn=args.self_attn) as tr:
            generate()
        nbytes = tr.nbytes
    else:
        generate()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_growth": max(0, peak - before), "nbytes": nbytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="first block width (SD 1.5: 320)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-self", dest="self_attn", action="store_false", help="cross-attention only")
    ap.add_argument("--fixed-mmap-threshold", action="store_true",
                    help="run the children with glibc's MALLOC_MMAP_THRESHOLD_=1 MiB: freed large temporaries "
                         "then go back to the OS at once, and the peak shows live tensors only")
    ap.add_argument("--mode", choices=["plain", "traced"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.mode:
        child(args)
        return

    base = [sys.executable, __file__, "--width", str(args.width), "--size", str(args.size),
            "--steps", str(args.steps)] + ([] if args.self_attn else ["--no-self"])
    env = dict(os.environ)
    if args.fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    result = {}
    for mode in ("plain", "traced"):
        out = subprocess.run(base + ["--mode", mode], capture_output=True, text=True, check=True, env=env).stdout
        result[mode] = json.loads(out.strip().splitlines()[-1])
    extra = result["traced"]["peak_growth"] - result["plain"]["peak_growth"]
    kept = result["traced"]["nbytes"]
    kinds = "cross + self" if args.self_attn else "cross"
    print(f"model: SD 1.5 UNet layout, width {args.width}, {args.size} px, {args.steps} steps, CFG batch 2, CPU; "
          f"trace: {kinds}, all layers and steps, heads averaged, float16"
          + ("; glibc mmap threshold fixed at 1 MiB" if args.fixed_mmap_threshold else ""))
    print(f"bytes kept by the trace: {kept / 1e6:.1f} MB")
    print(f"peak memory of the run: untraced +{result['plain']['peak_growth'] / 1e6:.1f} MB, "
          f"traced +{result['traced']['peak_growth'] / 1e6:.1f} MB")
    print(f"extra peak / bytes kept: {extra / max(kept, 1):.2f}   (beyond the kept bytes: {(extra - kept) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()

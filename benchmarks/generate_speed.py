"""Prompt -> image speed of the built-in model: 25 steps, guidance 7.5, one 64x64 image, on the CPU.

    python benchmarks/generate_speed.py                     # the built-in model
    python benchmarks/generate_speed.py --model runs/tiny --runs 7

Prints the median wall time of `--runs` generations after one warm-up (target: <= 1 s on a
2-core laptop CPU), with the text encoding, 25 UNet calls (batch 2: conditional and
unconditional) and the VAE decode included. Nothing else should run on the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built in) or a pipeline folder")
    parser.add_argument("--prompt", default="a red circle on the left and a blue square on the right")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sdlens.models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, progress=False)

    def generate(seed: int):
        generator = torch.Generator(args.device).manual_seed(seed)
        return pipe(
            args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator
        ).images[0]

    generate(0)  # warm-up: first calls allocate and pick kernels
    times = []
    for seed in range(1, args.runs + 1):
        start = time.perf_counter()
        image = generate(seed)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"model {args.model} on {args.device} ({torch.get_num_threads()} threads): prompt -> {image.size[0]}x{image.size[1]} "
        f"image, {args.steps} steps, guidance {args.guidance}: median {median:.3f} s over {args.runs} runs "
        f"(min {min(times):.3f}, max {max(times):.3f}); target <= 1 s: {'met' if median <= 1.0 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checks of the capture's GPU-only paths, on a device (seconds): the CPU test suite cannot reach them.

- maps stored on the CPU (copied asynchronously into page-locked memory at each step) equal maps
  stored on the GPU; the storage is page-locked while recording and released after; a run that
  stores on the CPU leaves no trace-sized memory on the GPU;
- the traced image equals the untraced one (fp32 on the GPU; the tests check this on the CPU);
- an interrupted run keeps the steps it made.

    python scripts/gpu_checks.py --device cuda     # prints one line per check and "all passed"; exit 1 on a failure
"""

from __future__ import annotations

import argparse
import sys

import torch

import sdlens
from sdlens.models.families import sd15_layout


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    pipe = sd15_layout(width=32, sample_size=32).to(dev)
    failures = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            failures.append(name)

    def run(steps: int = 6, **kw):
        g = torch.Generator(dev).manual_seed(0)
        return pipe("a red circle on the left", num_inference_steps=steps, height=256, width=256, generator=g,
                    output_type="latent", **kw).images

    plain = run()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    locked = []

    def note_locking(p, i, t, kw):  # while recording: is the CPU storage page-locked (asynchronous copies)?
        locked.append(all(f.pinned and f.buffer.is_pinned() for f in cpu_tracer.capture.recording.storage.values()))
        return kw

    cpu_tracer = sdlens.trace(pipe, self_attn=True)  # storage device: the CPU (the default)
    with cpu_tracer as on_cpu:
        traced = run(callback_on_step_end=note_locking)
    gpu_extra = torch.cuda.max_memory_allocated() - base if dev.startswith("cuda") else 0
    with sdlens.trace(pipe, self_attn=True, device=dev) as on_gpu:
        run()
    # GPU kernels may pick different algorithms from run to run, so "equal" is within a tolerance here
    image_diff = (plain - traced).abs().max().item()
    check("traced image equals untraced", image_diff <= 1e-4, f"max abs diff {image_diff:.2e} (limit 1e-4)")
    map_diff = max(diff(on_cpu.maps(n, k), on_gpu.maps(n, k)) for k, n in on_cpu.keys())
    check("maps stored on the CPU equal maps stored on the GPU", map_diff <= 1e-3 and len(on_cpu.keys()) > 0,
          f"{len(on_cpu.keys())} (kind, layer) pairs, max abs diff {map_diff:.1e} (limit 1e-3)")
    check("storage devices", all(on_cpu.maps(n, k).device.type == "cpu" for k, n in on_cpu.keys())
          and all(on_gpu.maps(n, k).device.type == dev.split(":")[0] for k, n in on_gpu.keys()))
    if dev.startswith("cuda"):
        check("CPU storage page-locked while recording", bool(locked) and all(locked), f"per step: {locked}")
        check("page-locking released after the run", not any(on_cpu.maps(n, k).is_pinned() for k, n in on_cpu.keys()))
    sums = torch.stack([on_cpu.maps(n, "cross").float().sum(-1).mean() for n in on_cpu.layers_of("cross")])
    check("cross-attention rows sum to 1", bool(((sums - 1).abs() < 2e-3).all()), f"{sums.min():.4f}..{sums.max():.4f}")
    if dev.startswith("cuda"):
        check("GPU memory does not hold the trace", gpu_extra < on_cpu.nbytes / 4,
              f"peak {gpu_extra / 1e6:.1f} MB above the start during a run keeping {on_cpu.nbytes / 1e6:.1f} MB")

    def stop(p, i, t, kw):
        if i == 2:
            raise KeyboardInterrupt
        return kw

    try:
        with sdlens.trace(pipe) as part:
            run(callback_on_step_end=stop)
    except KeyboardInterrupt:
        pass
    part_diff = max(diff(part.maps(n), on_cpu.maps(n)[:3]) for n in part.layers_of("cross"))
    check("an interrupted run keeps its steps", part.steps == [0, 1, 2] and part_diff <= 1e-3,
          f"steps {part.steps}, max abs diff to the full run's first 3: {part_diff:.1e}")
    print("all passed" if not failures else f"{len(failures)} failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

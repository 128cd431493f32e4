"""How a sweep scales with processes, and whether its memory stays flat.

    python benchmarks/sweep_scaling.py                 # 20 and 200 items, 1 and 2 CPU processes
    python benchmarks/sweep_scaling.py --items 40 --steps 10

Runs `sdlens sweep` on the built-in model over shapes-world captions: with 1 process, then with
2 processes through `accelerate launch --multi_gpu --num_processes 2` (CPU processes when there is
no GPU), and prints items per second (and the 2-to-1 ratio), and each process's peak resident
memory at each item count (flat means the sweep holds nothing per item between batches).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# each sweep process reports its own peak resident memory when it exits
PEAK = "import atexit, resource, sys; atexit.register(lambda: print(f'peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}', file=sys.stderr))"


def prompts_file(n: int, folder: Path) -> Path:
    from sdlens.world import caption, sample_scene

    rng = np.random.default_rng(2026)
    path = folder / f"prompts-{n}.txt"
    path.write_text("\n".join(caption(sample_scene(rng, free_prob=0.5)) for _ in range(n)) + "\n")
    return path


def run(n_proc: int, prompts: Path, out: Path, steps: int, batch: int) -> tuple[float, list[float]]:
    sweep = ["-c", f"{PEAK}; import sys; from sdlens.cli import main; sys.exit(main())", "sweep", str(prompts),
             "--out", str(out), "--steps", str(steps), "--batch", str(batch), "--no-progress"]
    if n_proc == 1:
        cmd = [sys.executable, *sweep]
    else:
        script = out.parent / "sweep_main.py"
        script.write_text(f"{PEAK}\nimport sys\nfrom sdlens.cli import main\nsys.exit(main())\n")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_proc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *sweep[2:]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peaks = [float(line.split()[-1]) for line in done.stderr.splitlines() if line.startswith("peak_rss_mb")]
    return seconds, peaks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="20,200", help="item counts, comma-separated")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.items.split(",")]
    print(f"sdlens sweep on the built-in model, {args.steps} steps, batch {args.batch}, {os.cpu_count()} CPUs")
    print(f"{'items':>6} {'processes':>10} {'seconds':>9} {'items/s':>8} {'peak RSS per process (MB)':>28}")
    rates: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in counts:
            prompts = prompts_file(n, tmp)
            for n_proc in (1, 2):
                seconds, peaks = run(n_proc, prompts, tmp / f"out-{n}-{n_proc}", args.steps, args.batch)
                rates[(n, n_proc)] = n / seconds
                print(f"{n:>6} {n_proc:>10} {seconds:>9.1f} {n / seconds:>8.2f} {', '.join(f'{p:.0f}' for p in peaks):>28}")
    for n in counts:
        print(f"{n} items: 2 processes / 1 process = {rates[(n, 2)] / rates[(n, 1)]:.2f}× the items per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())

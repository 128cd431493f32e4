"""What ``sdlens sweep PROMPTS --out DIR`` and ``sdlens report DIR`` do.

``sweep`` runs in one process, or in each process Hugging Face Accelerate launches
(``accelerate launch -m sdlens sweep ...``): each takes its share of the items
(``sdlens.sweep.assign``) and writes its own shards. Without a GPU it asks Accelerate for the CPU,
so that ``accelerate launch --multi_gpu --num_processes N`` on a CPU machine starts N CPU processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..analysis import SLOT_KINDS
from ..select import check_step_count
from ..sweep import SweepError, load, read_items, run_sweep
from ..vocabulary import renamed
from .attend import check_model_name
from .attend import load as load_model


def process_state() -> tuple[int, int, str | None]:
    """``(rank, num_processes, device)`` of this process: Accelerate's when it launched us, else (0, 1, None)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ
    if not launched:
        return 0, 1, None
    try:
        from accelerate import PartialState
    except ImportError:
        raise SweepError("this process was launched for several processes (WORLD_SIZE > 1) but accelerate is not "
                         "installed: pip install accelerate") from None
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, str(state.device)


@renamed(steps="num_inference_steps", guidance="guidance_scale", batch="batch_size")
def sweep(prompts: str, *, out: str, model: str = "tiny", seeds: int = 1, num_inference_steps: int = 25,
          guidance_scale: float = 7.5, layers=None, map_size: int = 16, batch_size: int = 4, progress: bool = True,
          log: Callable[[str], None] = print) -> list[str]:
    """Run (or resume) a sweep; returns the ids this process made."""
    check_step_count(num_inference_steps, what="--num-inference-steps", error=SweepError)
    if map_size < 1 or batch_size < 1:
        raise SweepError(f"--map-size and --batch-size must be positive; got {map_size} and {batch_size}")
    items = read_items(prompts, seeds)
    rank, num_processes, device = process_state()
    check_model_name(model)
    pipe = load_model(model, device, progress=False)
    settings = {"prompts": str(Path(prompts).resolve()), "model": model, "seeds": seeds,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "layers": layers,
                "map_size": map_size, "batch_size": batch_size}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="sweep", unit="image")
    try:
        made = run_sweep(pipe, items, out, settings, rank=rank, num_processes=num_processes, batch_size=batch_size,
                         progress=None if bar is None else (lambda n: bar.update(n * num_processes)))
    finally:
        if bar is not None:
            bar.close()
    log(f"rank {rank} of {num_processes}: made {len(made)} item(s) into {out}")
    return made


def _save(fig, ax, path: Path, *, ylabel: str, title: str) -> None:
    """A report figure (shares, 0..1, with a legend) labelled, written atomically, and closed."""
    import matplotlib.pyplot as plt

    from ..files import atomic_file

    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def report(root: str, *, log: Callable[[str], None] = print) -> list[Path]:
    """Write ``report/summary.md``, ``report/mass.png`` and ``report/localisation.png`` into ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    from ..files import atomic_file

    records = load(root)
    if not records:
        raise SweepError(f"{root!r} holds no finished items yet")
    out = Path(root) / "report"
    out.mkdir(exist_ok=True)
    sizes = sorted({s for r in records for s in r["mass"] if s != "all"}, key=int)
    lines = [f"# Sweep report: {len(records)} images, {len({r['prompt'] for r in records})} prompts", ""]
    lines += _mass_section(records, sizes, out / "mass.png")
    if any("all" in w for r in records for w in r["words"]):  # some word has a true mask
        lines += _localisation_section(records, [*sizes, "all"], out / "localisation.png")
        lines += _ranking_section(records)
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    paths = [p for p in (out / "summary.md", out / "mass.png", out / "localisation.png") if p.exists()]
    for p in paths:
        log(str(p))
    return paths


def _group_label(group: str) -> str:
    return group if group == "all" else f"{group}×{group}"


def _mass_section(records: list[dict], sizes: list[str], figure: Path) -> list[str]:
    """The attention mass per slot kind: a table per layer group (mean over steps, records), and over the
    steps (all layers) in ``figure``."""
    import matplotlib.pyplot as plt

    kinds = SLOT_KINDS + (("t5",) if all("t5" in r["mass"]["all"] for r in records) else ())
    lines = ["## Attention mass per slot kind (mean over steps, pixels and heads)", "",
             "| layers | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for s in [*sizes, "all"]:
        row = [np.mean([np.mean(r["mass"][s][k]) for r in records if s in r["mass"]]) for k in kinds]
        lines.append(f"| {_group_label(s)} | " + " | ".join(f"{v:.1%}" for v in row) + " |")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in kinds:
        ax.plot(np.mean([r["mass"]["all"][k] for r in records], axis=0), label=k)
    ax.set_xlabel("step")
    _save(fig, ax, figure, ylabel="share of the attention",
          title="where the cross-attention goes, over the steps (all layers)")
    return lines


def _localisation_section(records: list[dict], groups: list[str], figure: Path) -> list[str]:
    """Localisation per word kind and layer group: mean IoU / share of peaks on the mask, as a table and
    (IoU) as bars in ``figure``."""
    import matplotlib.pyplot as plt

    measured = [w for r in records for w in r["words"] if "all" in w]
    word_kinds = sorted({w["kind"] for w in measured})
    lines = ["", "## Localisation (IoU of the map's upper half with the true mask / peak on it)", "",
             "| word kind | " + " | ".join(_group_label(g) for g in groups) + " |",
             "| --- |" + " ---: |" * len(groups)]
    iou = {}
    for kind in word_kinds:
        ws = [w for w in measured if w["kind"] == kind]
        cells = []
        for g in groups:
            vals = [w[g] for w in ws if g in w]
            iou[kind, g] = np.mean([v["iou"] for v in vals])
            cells.append(f"{iou[kind, g]:.2f} / {np.mean([v['peak'] for v in vals]):.0%}")
        lines.append(f"| {kind} ({len(ws)}) | " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(word_kinds)
    for j, kind in enumerate(word_kinds):
        ax.bar(np.arange(len(groups)) + j * width, [iou[kind, g] for g in groups], width, label=kind)
    ax.set_xticks(np.arange(len(groups)) + width * (len(word_kinds) - 1) / 2, [_group_label(g) for g in groups])
    _save(fig, ax, figure, ylabel="mean IoU with the true mask", title="localisation per layer group and word kind")
    return lines


def _ranking_section(records: list[dict]) -> list[str]:
    """The prompts by the mean IoU of their measured words: all of them, or the best 5 and the worst 5."""
    scored = sorted((np.mean([w["all"]["iou"] for w in r["words"] if "all" in w]), r["id"], r["prompt"])
                    for r in records if any("all" in w for w in r["words"]))
    lines = ["", "## Best and worst prompts by mean IoU", "", "| IoU | item | prompt |", "| ---: | --- | --- |"]
    picks = scored[::-1] if len(scored) <= 10 else scored[::-1][:5] + scored[:5][::-1]  # best 5, worst 5
    return lines + [f"| {iou:.2f} | {item} | {prompt} |" for iou, item, prompt in picks]


__all__ = ["process_state", "report", "sweep"]

"""The whole run: the tiny model's three stages in order, then its pipeline folder and its record."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from sdlens.errors import ModelError
from sdlens.models.configs import TinyConfig, build_text_encoder

from .budget import DEFAULT_BUDGETS, STAGES, Budget
from .clip import load_text_encoder, train_clip
from .data import CaptionTokens
from .export import export_pipeline
from .machine import describe_device, versions
from .run import Run, write_record
from .unet import train_unet
from .vae import load_vae, train_vae


def train_tiny(
    out: str | os.PathLike,
    cfg: TinyConfig | None = None,
    *,
    budgets: dict[str, Budget] | None = None,
    stages: tuple[str, ...] | None = None,
    vae_from: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    checkpoint_minutes: float = 5.0,
    zero_unused_tokens: bool = True,
    command: list[str] | None = None,
    init_from: str | os.PathLike | None = None,
    precision: str = "auto",
) -> Path:
    """Train the tiny model and write its pipeline folder to `out`. Returns `out`.

    stages:   which stages to train; default: "clip" (only for text_mode="clip"), "vae" (unless
              `vae_from` is given) and "unet". ``("vae",)`` trains only a VAE, to share with
              several UNet runs through `vae_from`.
    budgets:  per stage, a `Budget` (steps and/or minutes, batch size, learning rate); stages
              not given use DEFAULT_BUDGETS.
    resume:   continue from the checkpoints in `out` (each stage goes on to its budget).
    precision: "auto" (bf16 autocast on CUDA, float32 on the CPU), "fp32" or "bf16" (also on
              the CPU, where AMX makes a UNet step about 1.3x faster).
    """
    from sdlens.tokens import load_clip_tokenizer

    cfg = cfg or TinyConfig()
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
    out = Path(out)
    stages = check_stages(out, cfg, stages, vae_from=vae_from, resume=resume)

    torch.manual_seed(seed)
    run = Run(out, cfg, seed=seed, device=device, resume=resume, progress=progress, log_every=log_every,
              checkpoint_minutes=checkpoint_minutes, precision=precision)
    run.init_from = init_from
    started = time.monotonic()
    print(f"training the tiny model on {run.device} into {out} (stages: {', '.join(stages)})", file=sys.stderr)
    tokenizer = load_clip_tokenizer()
    tokens = CaptionTokens(tokenizer)

    # stage 1: the text encoder
    if "clip" in stages:
        text_encoder = train_clip(run, budgets["clip"], tokens)
    elif cfg.text_mode == "clip":
        text_encoder = load_text_encoder(run, out / "train" / "text_encoder")
    else:
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(cfg).to(run.device)  # random init: trained jointly, or frozen as it is

    # stage 2: the autoencoder
    if "vae" in stages:
        vae = train_vae(run, budgets["vae"])
    elif "unet" in stages:
        vae = load_vae(run, vae_from or out)

    # stage 3: the denoiser, then the pipeline folder
    if "unet" in stages:
        unet, text_encoder = train_unet(run, budgets["unet"], vae, text_encoder, tokens)
        export_pipeline(out, cfg, vae, text_encoder, unet, tokenizer, zero_unused_tokens=zero_unused_tokens)

    record = {
        "command": command,
        "config": cfg.to_dict(),
        "seed": seed,
        "stages": run.stage_reports,
        "budgets": {s: vars(budgets[s]) for s in stages},
        "vae_from": str(vae_from) if vae_from else None,
        "device": describe_device(run.device),
        "precision": "bf16" if run.bf16 else "fp32",  # what the autocast ran, whatever was asked
        "wall_minutes": round((time.monotonic() - started) / 60, 2),
        "versions": versions(),
    }
    write_record(run, record, init_from=init_from)
    return out


def check_stages(out: Path, cfg: TinyConfig, stages: tuple[str, ...] | None, *, vae_from, resume: bool
                 ) -> tuple[str, ...]:
    """The stages to train (the default ones for ``cfg`` when None), checked before anything starts: known
    names, a VAE for the UNet stage, and no earlier run in ``out`` unless resuming it."""
    if stages is None:
        stages = tuple(s for s in STAGES if (s != "clip" or cfg.text_mode == "clip") and (s != "vae" or not vae_from))
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ModelError(f"unknown stages {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    if "vae" in stages and vae_from:
        raise ModelError("give either the 'vae' stage or vae_from, not both")
    has_vae = "vae" in stages or vae_from or (resume and (out / "train/vae").exists())
    if "unet" in stages and not has_vae:
        raise ModelError("the UNet stage needs a VAE: add the 'vae' stage, or pass vae_from=DIR (--vae-from DIR)")
    if not resume and (out / "train" / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    return stages


__all__ = ["check_stages", "train_tiny"]

"""Stage 2: the autoencoder (VAE), and finding a trained one to share between runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlens.errors import ModelError
from sdlens.models.configs import build_vae

from .budget import Budget
from .data import sample
from .loop import StageLoop, make_optimizer
from .run import Run


def train_vae(run: Run, budget: Budget) -> nn.Module:
    """The VAE: encode an image to a distribution over latents, sample one, decode it back.

    Loss = reconstruction (L1 + MSE, in [-1, 1] pixel units) + a tiny KL term towards N(0, 1),
    1e-6 per latent value (SD's autoencoder also weights its KL by 1e-6: it keeps the latents'
    scale tame, it is no real prior). SD adds a perceptual and an adversarial loss for photos;
    flat-coloured shapes do not need them.

    After training, `scaling_factor` (SD 1.x: 0.18215) is set to 1 / std of the latents, so that
    the UNet sees latents of unit variance, the scale its noise schedule assumes.
    """
    cfg, device = run.cfg, run.device
    vae = build_vae(cfg).to(device).train()
    optimizer = make_optimizer(vae.parameters(), budget.lr, device)

    loop = StageLoop(run, "vae", budget, {"vae": vae}, optimizer)
    while loop.running():
        loop.set_lr()
        images, _ = sample(run, budget, loop.generator)  # (N, 3, 64, 64) in [-1, 1]

        with run.autocast():
            posterior = vae.encode(images).latent_dist  # a diagonal Gaussian over (N, 4, 16, 16)
            latents = posterior.sample(generator=loop.generator)  # (N, 4, 16, 16)
            reconstruction = vae.decode(latents).sample  # (N, 3, 64, 64)
        reconstruction = reconstruction.float()
        recon_loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        kl = posterior.kl().float().mean() / latents[0].numel()  # per latent value
        loss = recon_loss + cfg.vae_kl_weight * kl

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        loop.end_step(loss)
    loop.close()

    vae.eval().requires_grad_(False)
    saved = run.train_dir / "vae" / "config.json"
    if loop.step == loop.steps_at_start and saved.exists():  # resumed a finished stage: keep its factor
        scaling_factor = json.loads(saved.read_text())["scaling_factor"]
    else:
        scaling_factor = latent_scaling_factor(run, vae, n=min(1024, max(64, 4 * budget.batch_size)))
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(run.train_dir / "vae")
    return vae


@torch.no_grad()
def latent_scaling_factor(run: Run, vae: nn.Module, n: int) -> float:
    """1 / standard deviation of the VAE's latents over n fresh images (seeded apart from training)."""
    from sdlens.world import sample_batch

    generator = torch.Generator(run.device).manual_seed(run.seed + 123_457)
    images, *_ = sample_batch(n, generator=generator, size=run.cfg.image_size, device=run.device)
    latents = torch.cat(
        [vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in images.split(256)]
    )
    return float(1.0 / latents.float().std())


def find_vae(path: str | os.PathLike) -> Path:
    """The AutoencoderKL folder in `path`: a train-tiny output (its train/vae or vae) or the VAE folder itself."""
    path = Path(path)
    for candidate in (path / "train" / "vae", path / "vae", path):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"no trained VAE in {path}: expected {path}/train/vae, {path}/vae or {path} itself to hold an "
        f"AutoencoderKL (config.json + weights), as `sdlens train-tiny --stages vae --out {path}` writes"
    )


def load_vae(run: Run, path: str | os.PathLike) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = find_vae(path)
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).float()
    expected = build_vae(run.cfg).config
    for key in ("block_out_channels", "latent_channels", "sample_size"):
        if tuple(_as_tuple(vae.config[key])) != tuple(_as_tuple(expected[key])):
            raise ModelError(
                f"the VAE in {folder} has {key}={vae.config[key]}, this config needs {expected[key]}"
            )
    print(f"[vae] using the trained VAE in {folder}", file=sys.stderr)
    return vae.to(run.device).eval().requires_grad_(False)


def _as_tuple(x):
    return x if isinstance(x, (list, tuple)) else (x,)


__all__ = ["find_vae", "latent_scaling_factor", "load_vae", "train_vae"]

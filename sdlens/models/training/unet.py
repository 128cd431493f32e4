"""Stage 3: the denoiser (UNet) learns to predict the noise in a noisy latent, given the caption."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlens.models.configs import build_train_scheduler, build_unet

from .budget import Budget
from .data import CaptionTokens, sample, world_token_ids
from .ema import EMA, frozen_copy
from .loop import StageLoop, make_optimizer
from .run import Run


def train_unet(
    run: Run, budget: Budget, vae: nn.Module, text_encoder: nn.Module, tokens: CaptionTokens
) -> tuple[nn.Module, nn.Module]:
    """The UNet learns to predict the noise in a noisy latent, given the timestep and the caption.

    One step, as in Stable Diffusion's training:
      1. draw images and captions; replace `caption_dropout` (10%) of the captions by "" so that
         the model also learns the unconditional prediction that classifier-free guidance needs;
      2. encode the images to latents with the frozen VAE (times its scaling factor);
      3. draw a timestep t per image and Gaussian noise; mix them by the DDPM schedule:
         noisy = sqrt(alpha_bar_t) * latent + sqrt(1 - alpha_bar_t) * noise;
      4. the text encoder turns the captions into (N, 77, width) slot vectors; with `word_dropout`
         or `tail_dropout`, some slots are zeroed (a zero key and value: the slot tells the UNet
         nothing); the UNet reads them through cross-attention and predicts the noise;
      5. loss: mean squared error between predicted and true noise, each image weighted by
         min(SNR_t, gamma) / SNR_t ("min-SNR": the nearly clean timesteps, which are easy and
         would otherwise dominate the gradient, count less). Nothing looks at attention maps.

    For ``text_mode="joint"`` the text encoder's weights are in the optimiser with the UNet's;
    otherwise it is frozen. Returns the exponential moving averages of both, which are exported.
    """
    cfg, device = run.cfg, run.device
    unet = build_unet(cfg).to(device).train()
    if run.init_from is not None:  # continue from an exported run's weights (a fresh optimiser)
        init_from_export(run.init_from, unet, text_encoder)
    joint = cfg.text_mode == "joint"
    text_encoder.train(joint).requires_grad_(joint)
    alphas_cumprod = build_train_scheduler(cfg).alphas_cumprod.to(device)  # (T,): the DDPM noise schedule
    empty_ids = tokens([""]).to(device)  # (1, 77): start, end, padding

    modules = {"unet": unet, "text_encoder": text_encoder}  # both go into the checkpoint
    emas = {"unet": EMA(unet)}
    params = list(unet.parameters())
    if joint:
        emas["text_encoder"] = EMA(text_encoder)
        params += list(text_encoder.parameters())
    optimizer = make_optimizer(params, budget.lr, device)

    loop = StageLoop(run, "unet", budget, modules, optimizer, emas)
    while loop.running():
        loop.set_lr()
        g = loop.generator
        images, captions = sample(run, budget, g)  # 1. (N, 3, 64, 64), N strings
        ids = drop_captions(tokens(captions).to(device, non_blocking=True), empty_ids, cfg.caption_dropout, g)

        with torch.no_grad(), run.autocast():  # 2. the frozen VAE's latents
            latents = vae.encode(images).latent_dist.sample(generator=g)  # (N, 4, 16, 16)
        latents = latents.float() * vae.config.scaling_factor
        t, noise, noisy = add_noise(latents, alphas_cumprod, g)  # 3.

        with run.autocast():  # 4.
            with nullcontext() if joint else torch.no_grad():
                text = text_encoder(input_ids=ids).last_hidden_state  # (N, 77, width)
            if cfg.word_dropout > 0 or cfg.tail_dropout > 0:
                dropped = word_slot_dropout(ids, tokens.tokenizer, cfg.word_dropout, g)  # (N, 77)
                dropped |= tail_slot_dropout(ids, tokens.tokenizer, cfg.tail_dropout, g)
                text = text.masked_fill(dropped[..., None], 0.0)
            predicted = unet(noisy, t, encoder_hidden_states=text).sample  # (N, 4, 16, 16)
        loss = noise_loss(predicted, noise, alphas_cumprod[t], cfg.snr_gamma)  # 5.

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for name, ema in emas.items():
            ema.update(modules[name], loop.step)
        loop.end_step(loss)
    loop.close()

    # the exported weights are the moving averages (a frozen text encoder is its own)
    text_export = emas["text_encoder"].averaged(text_encoder) if joint else frozen_copy(text_encoder)
    return emas["unet"].averaged(unet), text_export


def drop_captions(ids: torch.Tensor, empty_ids: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``ids`` (N, 77) with each caption replaced by the empty one (``empty_ids``, (1, 77)) with chance ``p``:
    the model also learns the unconditional prediction that classifier-free guidance needs."""
    drop = torch.rand(ids.shape[0], generator=generator, device=ids.device) < p  # (N,)
    return torch.where(drop[:, None], empty_ids, ids)


def add_noise(latents: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, noise, noisy)``: a timestep per latent, drawn uniformly, and Gaussian noise mixed in by the
    DDPM schedule, ``noisy = sqrt(alpha_bar_t) * latent + sqrt(1 - alpha_bar_t) * noise``."""
    n, device = latents.shape[0], latents.device
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator, device=device)  # (N,)
    noise = torch.randn(latents.shape, generator=generator, device=device)  # (N, 4, 16, 16)
    alpha_bar = alphas_cumprod[t][:, None, None, None]  # (N, 1, 1, 1)
    return t, noise, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def noise_loss(predicted: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, snr_gamma: float | None
               ) -> torch.Tensor:
    """Mean squared error between the predicted and the true noise; with ``snr_gamma``, each image weighted
    by min(SNR_t, gamma) / SNR_t ("min-SNR"), SNR_t = alpha_bar_t / (1 - alpha_bar_t)."""
    per_image = F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (N,)
    if snr_gamma is not None:
        snr = alpha_bar / (1 - alpha_bar)  # (N,)
        per_image = per_image * snr.clamp(max=snr_gamma) / snr
    return per_image.mean()


def word_slots(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Bool (N, 77): which slots of `ids` hold a word's token (not start, end or padding)."""
    special = torch.tensor(
        sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}), device=ids.device
    )
    return ~torch.isin(ids, special)


def word_slot_dropout(ids: torch.Tensor, tokenizer, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which slots to zero: each word slot of `ids` (N, 77) with chance `p`; never a start, end or
    padding slot. Returns a bool (N, 77) on the ids' device."""
    return word_slots(ids, tokenizer) & (torch.rand(ids.shape, generator=generator, device=ids.device) < p)


def tail_slot_dropout(ids: torch.Tensor, tokenizer, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which slots to zero: for each caption of `ids` (N, 77) with chance `p`, every slot after one
    of its word slots drawn uniformly (the end and padding slots too); captions without words
    ("") are left whole. Returns a bool (N, 77) on the ids' device."""
    n_words = word_slots(ids, tokenizer).sum(1)  # (N,): words sit in slots 1..n_words
    u = torch.rand(ids.shape[0], generator=generator, device=ids.device)
    cut = (u * n_words).long() + 1  # (N,): the last slot kept, a word slot drawn uniformly
    hit = (torch.rand(ids.shape[0], generator=generator, device=ids.device) < p) & (n_words > 0)
    position = torch.arange(ids.shape[1], device=ids.device)  # (77,)
    return hit[:, None] & (position[None, :] > cut[:, None])


def init_from_export(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module) -> None:
    """Load the UNet's and text encoder's weights from a pipeline folder that train-tiny wrote."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    src = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32, local_files_only=True)
    unet.load_state_dict(src.state_dict())
    te = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch.float32, local_files_only=True)
    text_encoder.load_state_dict(te.state_dict())
    fill_new_words(text_encoder)


def fill_new_words(text_encoder: nn.Module, seed: int = 0) -> list[int]:
    """Give the world's words whose token-embedding rows are all zero a random row; returns their token ids.

    An export zeroes the rows no world caption used (``export_pipeline``), so a word the world gained
    since ("small", "big") would read as its position alone, like any unknown word. It gets a random
    row of the same norm as the world's other rows (seeded, so a run repeats), as a frozen text
    encoder's untrained rows are: the UNet then learns to read it.
    """
    from sdlens.tokens import load_clip_tokenizer

    table = text_encoder.get_input_embeddings().weight  # (49408, width)
    tokenizer = load_clip_tokenizer()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = [i for i in world_token_ids(tokenizer) if i not in special]
    empty = [i for i in ids if not table[i].detach().any()]
    if empty:
        used = [i for i in ids if i not in empty]
        norm = table[used].detach().norm(dim=-1).mean() if used else torch.tensor(1.0)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(len(empty), table.shape[1], generator=g)
        with torch.no_grad():
            table[empty] = (rows / rows.norm(dim=-1, keepdim=True) * norm).to(table)
        print(f"[unet] new world words get random token rows: {tokenizer.convert_ids_to_tokens(empty)}",
              file=sys.stderr)
    return empty


__all__ = ["add_noise", "drop_captions", "fill_new_words", "init_from_export", "noise_loss",
           "tail_slot_dropout", "train_unet", "word_slot_dropout", "word_slots"]

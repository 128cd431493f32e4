"""Editing a real image: DDIM inversion of the image into a starting noise.

DDIM sampling is deterministic: it maps a starting noise ``x_T`` to an image. Run its update
backwards (``DDIMInverseScheduler``), from the image's latent ``x_0`` up to ``x_T``, with the
noise the UNet predicts for the image's own prompt, and sampling from that ``x_T`` with DDIM
gives the image back, up to the error of taking the UNet's prediction at the wrong end of each
step. An edit then starts its base and edited branches from that ``x_T``: the base branch
reconstructs the image, and the edited branch changes it through attention.

Inversion uses guidance 1 (the conditional prediction alone), as DDIM inversion usually does;
sampling at a higher guidance drifts from the image, and the reconstruction error says how far.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ..errors import EditError


@dataclass
class Inversion:
    """A real image inverted into a starting noise.

    Attributes:
        latent: ``x_T (1, C, h, w)``: sampling from it with ``scheduler`` gives the image back.
        image: the image, ``(H, W, 3)`` uint8.
        scheduler: the DDIM scheduler to sample with (the pipeline's own is swapped for it while
            the edit runs).
        steps: the number of DDIM steps inverted.
        method: ``"ddim"``.
    """

    latent: torch.Tensor
    image: np.ndarray
    scheduler: DDIMScheduler
    steps: int
    method: str = "ddim"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[:2])

    def error(self, reconstruction) -> float:
        """Mean absolute difference with ``reconstruction`` (PIL, array in 0..255 or 0..1), in 0..1."""
        rec = np.asarray(reconstruction)
        rec = rec.astype(np.float64) / (255.0 if rec.dtype == np.uint8 or rec.max() > 1.5 else 1.0)
        return float(np.abs(rec - self.image.astype(np.float64) / 255.0).mean())


def as_image_array(image, size: tuple[int, int]) -> np.ndarray:
    """``image`` (PIL RGB, ``(H, W, 3)`` array, or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in 0..1) as uint8
    ``(H, W, 3)``; its ``(H, W)`` must be ``size``."""
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        if image.mode != "RGB":
            raise EditError(f"image mode {image.mode!r} is not supported; give an RGB image (image.convert('RGB'))")
        arr = np.asarray(image)
    elif torch.is_tensor(image):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise EditError(f"an image tensor must be (3, H, W) or (1, 3, H, W) with values in 0..1; got {tuple(image.shape)}")
        arr = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise EditError(f"an image array must be (H, W, 3) RGB; got shape {image.shape}")
        arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    else:
        raise EditError(f"image must be a PIL image, an (H, W, 3) array or a (3, H, W) tensor; got {type(image).__name__}")
    if arr.shape[:2] != tuple(size):
        raise EditError(f"the image is {arr.shape[0]}×{arr.shape[1]} (H×W) but the edit runs at {size[0]}×{size[1]}; "
                        f"resize it, or pass height={arr.shape[0]}, width={arr.shape[1]}")
    return np.ascontiguousarray(arr)


def ddim_pair(scheduler) -> tuple[DDIMScheduler, DDIMInverseScheduler]:
    """A DDIM sampler and its inverse on ``scheduler``'s noise schedule, both with "trailing" timesteps
    (the inverse scheduler takes no "linspace"; "trailing" reaches t = T - 1, pure noise, at its end)."""

    def own(cls) -> dict:
        keys = inspect.signature(cls.__init__).parameters
        # latents are not in [-1, 1]: DDIM's default clipping of the predicted x0 would wreck them
        return {k: v for k, v in scheduler.config.items() if k in keys} | {"timestep_spacing": "trailing", "clip_sample": False}

    return DDIMScheduler.from_config(own(DDIMScheduler)), DDIMInverseScheduler.from_config(own(DDIMInverseScheduler))


@torch.no_grad()
def invert(pipe, image, prompt: str, latent_size: tuple[int, int], *, num_inference_steps: int = 50,
           guidance_scale: float | None = None) -> Inversion:
    """DDIM-invert ``image`` with ``prompt`` over ``num_inference_steps`` steps (``guidance_scale`` is
    the edit's; inversion itself runs at guidance 1)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EditError("image= (real-image editing) supports SD 1.x/2.x pipelines; SDXL's is not supported yet")
    f = pipe.vae_scale_factor
    arr = as_image_array(image, (latent_size[0] * f, latent_size[1] * f))
    device, dtype = pipe._execution_device, pipe.unet.dtype
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(device, torch.float32) / 127.5 - 1
    z = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    context = pipe.text_encoder(ids)[0].to(dtype)
    sampler, inverse = ddim_pair(pipe.scheduler)
    inverse.set_timesteps(num_inference_steps, device=device)
    latent = z.to(dtype)
    for t in inverse.timesteps:
        eps = pipe.unet(latent, t, encoder_hidden_states=context).sample
        latent = inverse.step(eps, t, latent).prev_sample
    return Inversion(latent, arr, sampler, num_inference_steps)


__all__ = ["Inversion", "as_image_array", "ddim_pair", "invert"]

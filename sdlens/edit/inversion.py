"""Editing a real image: DDIM inversion of the image into a starting noise.

DDIM sampling is deterministic: it maps a starting noise ``x_T`` to an image. Run its update
backwards (``DDIMInverseScheduler``), from the image's latent ``x_0`` up to ``x_T``, with the
noise the UNet predicts for the image's own prompt, and sampling from that ``x_T`` with DDIM
gives the image back, up to the error of taking the UNet's prediction at the wrong end of each
step. An edit then starts its base and edited branches from that ``x_T``: the base branch
reconstructs the image, and the edited branch changes it through attention.

Inversion uses guidance 1 (the conditional prediction alone), as DDIM inversion usually does;
sampling at a higher guidance drifts from the image, and the reconstruction error says how far.

Null-text inversion (Mokady et al., 2022) closes that gap: after the DDIM inversion it tunes, one
sampling step at a time, the embedding of the empty prompt that guidance subtracts, so that the
guided DDIM step from the sampled latent lands on the inverted trajectory's latent. Sampling with
those per-step embeddings in the unconditional rows (``null_text``) gives the image back at any
guidance; it costs a backward pass through the UNet per tuning iteration.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ..errors import EditError
from ..hooks.layers import vae_factor
from ..select import check_choice, check_step_count
from ..vocabulary import renamed


@dataclass
class Inversion:
    """A real image inverted into a starting noise.

    Attributes:
        latent: ``x_T (1, C, h, w)``: sampling from it with ``scheduler`` gives the image back.
        image: the image, ``(H, W, 3)`` uint8.
        scheduler: the DDIM scheduler to sample with (the pipeline's own is swapped for it while
            the edit runs).
        steps: the number of DDIM steps inverted.
        method: ``"ddim"`` or ``"null-text"``.
        prompt: the prompt the image was inverted with (an edit's base prompt must be it).
        guidance_scale: the guidance the null-text embeddings were tuned for (None for ``"ddim"``).
        null_embeddings: ``"null-text"``: the unconditional embedding of each sampling step,
            ``(steps, 1, tokens, dim)``.
    """

    latent: torch.Tensor
    image: np.ndarray
    scheduler: DDIMScheduler
    steps: int
    method: str = "ddim"
    prompt: str | None = None
    guidance_scale: float | None = None
    null_embeddings: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[:2])

    def error(self, reconstruction) -> float:
        """Mean absolute difference with ``reconstruction`` (PIL, array in 0..255 or 0..1), in 0..1."""
        rec = np.asarray(reconstruction)
        rec = rec.astype(np.float64) / (255.0 if rec.dtype == np.uint8 or rec.max() > 1.5 else 1.0)
        return float(np.abs(rec - self.image.astype(np.float64) / 255.0).mean())


def as_image_array(image, size: tuple[int, int] | None = None) -> np.ndarray:
    """``image`` (PIL RGB, ``(H, W, 3)`` array, or ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in 0..1) as uint8
    ``(H, W, 3)``; its ``(H, W)`` must be ``size`` when given."""
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
    if size is not None and arr.shape[:2] != tuple(size):
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


INVERSIONS = ("ddim", "null-text")
"""How a real picture is inverted (``invert(inversion=...)``, an edit's ``inversion=``, ``--inversion``)."""


def __getattr__(name: str):
    if name == "METHODS":  # its old name, kept for one release
        from ..errors import warn

        warn("sdlens.edit.inversion.METHODS is now INVERSIONS (sdlens.edit.METHODS are the edit methods)",
             DeprecationWarning)
        return INVERSIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@renamed(method="inversion")
def invert(pipe, image, prompt: str, latent_size: tuple[int, int], *, num_inference_steps: int = 50,
           guidance_scale: float | None = None, inversion: str = "ddim", tune_iterations: int = 10,
           learning_rate: float = 1e-2) -> Inversion:
    """Invert ``image`` (its ``(H, W)`` must be ``latent_size`` times the VAE's factor) with ``prompt``
    over ``num_inference_steps`` DDIM steps.

    ``inversion="ddim"``: plain DDIM inversion at guidance 1. ``"null-text"``: then tune the empty
    prompt's embedding per step for ``guidance_scale`` (``tune_iterations`` Adam steps at most per
    sampling step, from ``learning_rate``).
    """
    method = check_choice(inversion, INVERSIONS, what="inversion", error=EditError)
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise EditError("image= (real-image editing) supports SD 1.x/2.x pipelines; SDXL's is not supported yet")
    check_step_count(num_inference_steps, error=EditError)
    if method == "null-text":
        if guidance_scale is None or not float(guidance_scale) > 1.0:
            raise EditError(f"null-text inversion tunes the embedding that guidance subtracts: it needs "
                            f"guidance_scale > 1; got {guidance_scale!r} (use inversion='ddim' without guidance)")
        if not isinstance(tune_iterations, int) or isinstance(tune_iterations, bool) or tune_iterations < 1:
            raise EditError(f"tune_iterations must be a positive int; got {tune_iterations!r}")
    f = vae_factor(pipe)
    arr = as_image_array(image, (latent_size[0] * f, latent_size[1] * f))
    sampler, inverse = ddim_pair(pipe.scheduler)
    with torch.no_grad():
        z = _encode(pipe, arr)
        context = _embed(pipe, prompt)
        inverse.set_timesteps(num_inference_steps, device=z.device)
        path = [z]  # x_0, then the latent after each inverse step: path[-1] is x_T
        for t in inverse.timesteps:
            eps = pipe.unet(path[-1], t, encoder_hidden_states=context).sample
            path.append(inverse.step(eps, t, path[-1]).prev_sample)
    inversion = Inversion(path[-1], arr, sampler, num_inference_steps, prompt=prompt)
    if method == "null-text":
        inversion.null_embeddings = _tune_null_text(pipe, path, context, sampler, float(guidance_scale),
                                                    tune_iterations, learning_rate)
        inversion.method, inversion.guidance_scale = method, float(guidance_scale)
    return inversion


def _encode(pipe, arr: np.ndarray) -> torch.Tensor:
    """The scaled VAE latent ``(1, C, h, w)`` of a uint8 ``(H, W, 3)`` image, in the UNet's dtype."""
    device = pipe._execution_device
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(device, torch.float32) / 127.5 - 1
    z = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    return z.to(pipe.unet.dtype)


def _embed(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's hidden states ``(1, tokens, dim)`` of ``prompt``, as the pipeline pads it."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe._execution_device)
    return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)


def _tune_null_text(pipe, path: list[torch.Tensor], context: torch.Tensor, sampler: DDIMScheduler,
                    guidance: float, iterations: int, lr: float) -> torch.Tensor:
    """Per sampling step ``i``: the unconditional embedding with which the guided DDIM step from the
    sampled latent lands closest to ``path[-2 - i]``, tuned from the previous step's (the first from
    the empty prompt's). Returns ``(steps, 1, tokens, dim)``."""
    unet = pipe.unet
    null = _embed(pipe, "").detach()
    sampler.set_timesteps(len(path) - 1, device=path[0].device)
    latent, tuned = path[-1], []
    grads = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)  # only the embedding is tuned
    try:
        for i, t in enumerate(sampler.timesteps):
            goal = path[-2 - i]
            with torch.no_grad():
                eps_cond = unet(latent, t, encoder_hidden_states=context).sample
            emb = null.float().clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=lr * max(1.0 - i / 100, 0.1))  # smaller steps as the image settles
            for _ in range(iterations):
                eps_null = unet(latent, t, encoder_hidden_states=emb.to(unet.dtype)).sample
                eps = eps_null + guidance * (eps_cond - eps_null)
                step = sampler.step(eps, t, latent).prev_sample  # DDIM's update is plain tensor math: differentiable
                loss = torch.nn.functional.mse_loss(step.float(), goal.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < 1e-5 + i * 2e-5:  # close enough: the later steps need less
                    break
            null = emb.detach().to(unet.dtype)
            tuned.append(null)
            with torch.no_grad():
                eps_null = unet(latent, t, encoder_hidden_states=null).sample
                latent = sampler.step(eps_null + guidance * (eps_cond - eps_null), t, latent).prev_sample
    finally:
        for p, g in zip(unet.parameters(), grads):
            p.requires_grad_(g)
    return torch.stack(tuned)


@contextmanager
def null_text(unet, inversion: Inversion, n_uncond: int):
    """While sampling: the first ``n_uncond`` rows (the unconditional half) of the UNet's text input at
    call ``i`` become ``inversion.null_embeddings[i]``. A forward pre-hook, removed on exit."""
    calls = [0]

    def swap(module, args, kwargs):
        key = "encoder_hidden_states"
        states = kwargs[key] if key in kwargs else args[2]
        if calls[0] >= len(inversion.null_embeddings):
            raise EditError(f"the UNet ran more than the {len(inversion.null_embeddings)} steps the image was "
                            "null-text inverted for")
        states = states.clone()
        states[:n_uncond] = inversion.null_embeddings[calls[0]].to(states)
        calls[0] += 1
        if key in kwargs:
            return args, {**kwargs, key: states}
        return (*args[:2], states, *args[3:]), kwargs

    handle = unet.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["INVERSIONS", "Inversion", "as_image_array", "ddim_pair", "invert", "null_text"]

"""Recording the denoising itself: x_t, the predicted clean latent x0 and the noise level per step.

The pipeline's ``scheduler.step(model_output, timestep, sample)`` sees the *guided* prediction and
the current latent, so wrapping it (as an instance attribute, deleted afterwards) is enough for any
pipeline. Where the scheduler does not return ``pred_original_sample`` it is derived here from the
prediction type and the noise schedule.
"""

from __future__ import annotations

import numpy as np
import torch


def _flow_matching(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def noise_level_and_x0(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, out, idx):
    """``(noise_level, x0)``: the share of noise in ``sample`` (0 = clean, 1 = pure noise) and x0.

    ``out`` is what the scheduler's step returned; ``idx`` the step index this step had.
    """
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    x0 = getattr(out, "pred_original_sample", None) if out is not None else None
    t = timestep.flatten()[0] if torch.is_tensor(timestep) else torch.tensor(float(timestep))
    sigmas = getattr(scheduler, "sigmas", None)
    if _flow_matching(scheduler):  # x_t = (1 - σ) x0 + σ ε, the model predicts v = ε - x0
        sigma = float(sigmas[idx]) if idx is not None else float(t) / scheduler.config.num_train_timesteps
        if x0 is None:
            x0 = sample - sigma * model_output
        return sigma, x0
    if getattr(scheduler, "init_noise_sigma", 1.0) > 1.0 and sigmas is not None and idx is not None:
        sigma = float(sigmas[idx])  # Euler-type: x_t = x0 + σ ε
        if x0 is None:
            if pred == "epsilon":
                x0 = sample - sigma * model_output
            elif pred == "v_prediction":
                x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
            else:
                x0 = model_output
        return sigma / (1 + sigma**2) ** 0.5, x0
    alphas = scheduler.alphas_cumprod.to(sample.device)  # DDPM-type: x_t = √ᾱ x0 + √(1-ᾱ) ε
    a = alphas[int(t.round().item())].to(sample.dtype)
    if x0 is None:
        if pred == "epsilon":
            x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        elif pred == "v_prediction":
            x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        else:
            x0 = model_output
    return float((1 - a).sqrt()), x0


class DenoisingRecorder:
    """Wraps ``scheduler.step`` of one pipeline; keeps x_t and x0 of the kept steps."""

    def __init__(self, capture) -> None:
        self.capture = capture  # its ``keeping``: whether a step is kept; ``spec.device``: where to store
        self.latents: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.noise: list[float] = []
        self._scheduler = None

    def install(self, scheduler) -> None:
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            idx = getattr(scheduler, "step_index", None)
            out = original(model_output, timestep, sample, *args, **kwargs)
            if self.capture.keeping:
                if idx is None and getattr(scheduler, "step_index", None) is not None:
                    idx = scheduler.step_index - 1  # the first step() sets the index, then advances it
                out0 = out[0] if isinstance(out, tuple) else out
                level, x0 = noise_level_and_x0(scheduler, model_output, timestep, sample, out0, idx)
                store = self.capture.spec.device
                self.latents.append(sample.detach().to(store, torch.float32))
                self.x0.append(x0.detach().to(store, torch.float32))
                self.noise.append(level)
            return out

        scheduler.step = step
        self._scheduler = scheduler

    def uninstall(self) -> None:
        if self._scheduler is not None and "step" in vars(self._scheduler):
            del self._scheduler.step
        self._scheduler = None

    def finish(self, info, pipe) -> None:
        """Stack what was recorded into ``info`` (the trace's ``TraceInfo``) and decode previews with the
        pipeline's VAE."""
        if not self.latents:
            return
        n = min(len(self.latents), len(info.steps))
        info.latents = torch.stack(self.latents[:n])  # (steps, prompts·images, c, h, w)
        info.x0 = torch.stack(self.x0[:n])
        info.noise_levels = self.noise[:n]
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            info.xt_images = decode(vae, info.latents)
            info.x0_images = decode(vae, info.x0)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode ``(steps, n, c, h, w)`` latents one at a time: uint8 ``(steps, n, H, W, 3)``."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    p = next(vae.parameters())
    frames = []
    for z in latents.flatten(0, 1):
        img = vae.decode((z[None].to(p.device, p.dtype) / scale) + shift).sample[0]
        frames.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu())
    out = torch.stack(frames).reshape(*latents.shape[:2], *frames[0].shape)
    return out.numpy()

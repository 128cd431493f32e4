"""``Run``: what the controllers know of one hooked run (the pipeline, the step, the batch's rows, the sizes).

It is made by ``attach`` and handed to every controller; it knows nothing of the controllers
themselves, so the processor and the controllers can name it without an import cycle.
"""

from __future__ import annotations

import torch

from ..errors import CaptureError
from .layers import LayerInfo, attention_layers, token_packing, vae_factor
from .rows import RowLayout, row_layout


class Run:
    """What the controllers know of the run: the pipeline, the step, the batch's rows, the sizes.

    Filled as the run goes: ``call`` when the pipeline encodes its prompt, the rest at the
    denoiser's first call (``step`` 0).
    """

    def __init__(self, pipe, denoiser: torch.nn.Module, prompt=None) -> None:
        self.pipe = pipe  # None when a bare denoiser is hooked
        self.denoiser = denoiser
        self.layers: list[LayerInfo] = attention_layers(denoiser)
        self.call: dict | None = {"prompt": prompt} if prompt is not None else None  # encode_prompt's arguments
        self.encoded = False  # the traced pipeline's encode_prompt ran (so it is the pipeline that runs)
        self.step = -1  # the denoiser call under way (sampling order, from 0)
        self.timestep = None  # its timestep (a tensor on a GPU run: read at the end, no sync per step)
        self.layout: RowLayout | None = None
        self.latent_size: tuple[int, int] | None = None
        self.image_size: tuple[int, int] | None = None
        self.context_len = 0  # keys of the encoder states (77 for SD 1.x; more for SD 3)
        self.n_concepts = 0  # concept tokens appended to the encoder states (SD 3; Controller.context_tokens)
        self.expected_steps: int | None = None  # the number of denoiser calls the scheduler plans

    def _expected_steps(self) -> int | None:
        # diffusers pipelines set _num_timesteps = len(timesteps) just before their loop (img2img too);
        # it is this run's only if the traced pipeline is the one running, else it is a past run's
        if self.encoded:
            n = getattr(self.pipe, "_num_timesteps", None)
            if isinstance(n, int) and n > 0:
                return n
        sched = getattr(self.pipe, "scheduler", None)  # shared with pipelines made from its components
        ts = getattr(sched, "timesteps", None)
        if ts is None or not len(ts):
            return None
        if self.timestep is not None:  # the run goes from this step's timestep to the end of the schedule
            here = ((ts.float().cpu() - float(self.timestep)).abs() < 1e-3).nonzero()
            if len(here):
                return len(ts) - int(here[0, 0])
        begin = getattr(sched, "begin_index", None) or 0
        return len(ts) - begin

    def _start(self, sample: torch.Tensor, context: torch.Tensor | None, img_ids=None) -> None:
        self.latent_size = _latent_size(sample, img_ids, token_packing(self.denoiser))
        f = vae_factor(self.pipe)
        self.image_size = (self.latent_size[0] * f, self.latent_size[1] * f)
        self.context_len = context.shape[1] if context is not None else 0
        self.expected_steps = self._expected_steps()
        if self.encoded and self.call.get("separate_negative"):
            raise CaptureError(
                f"{type(self.pipe).__name__} encodes its negative prompt on its own and runs it as a second "
                "denoiser call at each step (true classifier-free guidance), which sdlens does not trace: "
                "call it without negative_prompt (or with true_cfg_scale=1)"
            )
        cfg, pag = None, False  # what the running pipeline says, when it is the traced one
        if self.encoded:
            cfg = self.call.get("cfg", getattr(self.pipe, "do_classifier_free_guidance", None))
            pag = bool(getattr(self.pipe, "do_perturbed_attention_guidance", False))
        self.layout = row_layout(sample.shape[0], self.call, cfg, pag)


def _latent_size(sample: torch.Tensor, img_ids, packing: int) -> tuple[int, int]:
    """``(h, w)`` of the latent a denoiser input stands for.

    A latent image ``(b, c, h, w)`` gives its own; a sequence of packed tokens ``(b, n, c)`` (Flux)
    gives its token grid from the tokens' position ids ``(n, 3)`` (0, row, column), times the
    pipeline's packing; with no ids, a square grid.
    """
    if sample.ndim != 3:
        return tuple(sample.shape[-2:])
    if torch.is_tensor(img_ids) and img_ids.shape[-1] >= 3:
        ids = img_ids.reshape(-1, img_ids.shape[-1])
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w == sample.shape[1]:
            return h * packing, w * packing
    side = int(sample.shape[1] ** 0.5)
    if side * side != sample.shape[1]:
        raise CaptureError(f"cannot tell the image grid of a denoiser input of {sample.shape[1]} tokens "
                           "(no img_ids, not a square)")
    return side * packing, side * packing

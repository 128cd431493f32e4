"""``sdlens.trace``: capture attention maps while a pipeline runs, as one controller on the hooks."""

from __future__ import annotations

import torch

from ..hooks.attach import attach
from ..result.attention_trace import AttentionTrace
from .controller import Capture
from .spec import CaptureSpec, Estimate


class Tracer:
    """What ``sdlens.trace`` returns: ``with`` it, the pipeline's next call is traced; ``as`` gives the
    ``AttentionTrace``, which fills while the pipeline runs."""

    def __init__(self, pipe, spec: CaptureSpec, prompt=None) -> None:
        self.capture = Capture(spec)
        self.attachment = attach(pipe, [self.capture], prompt=prompt)

    def __enter__(self) -> AttentionTrace:
        self.attachment.__enter__()
        return self.capture.trace

    def __exit__(self, exc_type, exc, tb) -> None:
        self.attachment.__exit__(exc_type, exc, tb)

    @property
    def trace(self) -> AttentionTrace:
        return self.capture.trace

    @property
    def estimate(self) -> Estimate | None:
        """The capture's size, computed before the denoiser's first forward (None: step count unknown)."""
        return self.capture.estimate

    @property
    def n_steps_expected(self) -> int | None:
        """The number of steps the pipeline said it would run (None for a bare denoiser)."""
        return self.attachment.run.expected_steps


def trace(
    pipe,
    *,
    cross: bool = True,
    self_attn: bool = False,
    text_attn: bool = False,
    concepts=None,
    layers=None,
    self_layers=None,
    steps=None,
    heads="mean",
    cfg: str = "cond",
    dtype: torch.dtype = torch.float16,
    device="cpu",
    max_bytes: int | None = None,
    record_latents: bool = False,
    prompt=None,
) -> Tracer:
    """Capture attention maps while ``pipe`` runs; ``with trace(pipe) as tr:`` gives an ``AttentionTrace``.

    Args:
        pipe: a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, img2img, ...) or its denoiser.
        cross: capture cross-attention (pixel → prompt token).
        self_attn: capture self-attention (pixel → pixel); large: ``(h·w)²`` per map.
        text_attn: joint-attention models (SD 3): also capture the text tokens' queries, text → image
            (``"text_image"``, ``(tokens, h·w)`` per map) and text → text (``"text_text"``).
        concepts: joint-attention models: words (``["circle", "square", "background"]``) whose
            ConceptAttention maps to keep (``tr.concept_map("circle")``). They ride through the
            blocks beside the prompt and leave the picture unchanged (``sdlens.capture.concepts``).
        layers: ``None`` (all), a diffusers module path or glob (``"up_blocks.*"``), an int map side
            (``16``), a list of these, or a predicate on the name.
        self_layers: the self-attention layers, chosen the same ways, when they should differ from
            the cross-attention ones (self-attention maps grow as ``(h·w)²``: ``self_layers=16``
            keeps only the small ones); ``layers`` then picks only cross-attention layers. ``None``:
            ``layers`` picks both.
        steps: ``None`` (all) or step indices in sampling order (negative from the end).
        heads: ``"mean"`` (average heads), ``"all"``, or a list of head indices to keep.
        cfg: which classifier-free-guidance half to keep: ``"cond"``, ``"uncond"`` or ``"both"``.
        dtype: how the maps are stored. Each layer's storage for all kept steps is
            allocated at its first step and filled step by step (from a GPU into a CPU store:
            asynchronous copies into page-locked memory), so the maps are not held twice when the
            pipeline says how many steps it runs (tracing a bare denoiser, storage doubles as it fills).
        device: where the maps are stored.
        max_bytes: memory budget; an over-budget capture raises ``BudgetError`` (a ``ValueError``) with
            the estimate before the denoiser's first forward.
        record_latents: also keep, per captured step, x_t, the predicted clean latent x0, the noise
            level and VAE-decoded previews of both (``tr.latents``, ``tr.x0``, ``tr.noise_levels``,
            ``tr.xt_images``, ``tr.x0_images``).
        prompt: the prompt(s), when the pipeline is called with ``prompt_embeds`` or the denoiser is
            traced directly.

    Example::

        with sdlens.trace(pipe, layers=16) as tr:
            pipe("a red circle on the left", num_inference_steps=20)
        tr.word_map("circle").shape   # the image's (H, W)
    """
    spec = CaptureSpec(
        cross=cross,
        self_attn=self_attn,
        text_attn=text_attn,
        concepts=concepts,
        layers=layers,
        self_layers=self_layers,
        steps=steps,
        heads=heads,
        cfg=cfg,
        dtype=dtype,
        device=device,
        max_bytes=max_bytes,
        record_latents=record_latents,
    )
    return Tracer(pipe, spec, prompt=prompt)


__all__ = ["Tracer", "trace"]

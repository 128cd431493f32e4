"""Find the attention layers of a diffusers denoiser and say what each one sees.

A *layer* is named by its diffusers module path without the ``.processor`` suffix, e.g.
``up_blocks.1.attentions.0.transformer_blocks.0.attn2``. Each layer has a *role*:

- ``"cross"``: queries are image pixels, keys are prompt tokens (SD 1/2/XL ``attn2``);
- ``"self"``: queries and keys are image pixels (SD 1/2/XL ``attn1``, SD 3.5 ``attn2``);
- ``"joint"``: one softmax over image *and* text keys, for image *and* text queries (SD 3 MMDiT
  ``attn``, Flux's double-stream ``transformer_blocks.N.attn`` and single-stream
  ``single_transformer_blocks.N.attn``); its image→text part is captured as ``"cross"``, its
  image→image part as ``"self"``, and the text queries' parts as ``"text_image"`` (text→image) and
  ``"text_text"``.

How a joint layer orders its sequence differs: SD 3 puts the image's tokens first and keeps the
two streams' weights apart; Flux puts the text first (``LayerInfo.text_first``), and its
single-stream blocks run text and image as one sequence with one set of weights
(``LayerInfo.single_stream``: the layer is called with no text input, the text being the first
``Run.context_len`` tokens of its sequence). The hooks hand every controller the SD 3 order
(image, then text), whatever the layer's own.

A layer's map size is derived from the denoiser's structure (how many times the latent was
downsampled before it, or the patch size), so the memory a capture needs can be estimated before
the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CaptureError

ROLES = ("cross", "self", "joint")
TEXT_KINDS = ("text_image", "text_text")  # the text queries' parts of a joint layer
CONCEPT_KINDS = ("concept", "concept_image")  # concept tokens' maps: output-space scores, their rows over the image


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser.

    ``factor`` is how much smaller (per side) its query grid is than the latent; ``None`` when the
    structure is unknown and the grid must be inferred at run time.
    """

    name: str
    role: str
    heads: int
    factor: int | None
    ceil_steps: int = 0  # number of stride-2 downsamplings (ceil-halving) before this layer
    text_first: bool = False  # joint layers: the sequence is text then image (Flux), not image then text
    single_stream: bool = False  # joint layers: text and image come as one sequence (Flux's single blocks)

    def kinds(self) -> tuple[str, ...]:
        """The capture kinds this layer can provide."""
        return ("cross", "self", *TEXT_KINDS, *CONCEPT_KINDS) if self.role == "joint" else (self.role,)

    def map_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Query grid ``(h, w)`` of this layer for a latent of size ``latent_hw``."""
        h, w = latent_hw
        if self.factor is None:
            raise CaptureError(f"layer {self.name!r}: map size unknown before run time")
        if self.ceil_steps:  # UNet: each downsampler is a stride-2 conv, i.e. ceil(h / 2)
            for _ in range(self.ceil_steps):
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            return h, w
        return h // self.factor, w // self.factor


DENOISER_ATTRIBUTES = ("unet", "transformer", "prior")


def _is_compiled(module) -> bool:
    """``module`` is the wrapper ``torch.compile`` returns (its original module is ``_orig_mod``)."""
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def compiled_denoiser(pipe) -> tuple[str, torch.nn.Module] | None:
    """``(attribute, compiled module)`` when a pipeline's denoiser is a ``torch.compile`` wrapper, else None."""
    for attr in DENOISER_ATTRIBUTES:
        mod = getattr(pipe, attr, None)
        if _is_compiled(mod):
            return attr, mod
    return None


def denoiser_of(obj) -> torch.nn.Module:
    """The denoiser (UNet or transformer) of a pipeline, or ``obj`` itself if it is one.

    A pipeline's ``torch.compile``'d denoiser gives the module under the wrapper (a compiled graph
    would not see the processors sdlens installs); a compiled denoiser given directly is refused.
    """
    if _is_compiled(obj):
        raise CaptureError(
            "this denoiser is a torch.compile'd module, whose compiled graph would not see the attention "
            "processors sdlens installs: trace the pipeline instead (sdlens.trace(pipe) runs the original "
            "module while tracing and puts the compiled one back), or trace the original module "
            "(compiled._orig_mod) and call that one inside the trace"
        )
    if hasattr(obj, "attn_processors") and hasattr(obj, "set_attn_processor"):
        return obj
    for attr in DENOISER_ATTRIBUTES:
        mod = getattr(obj, attr, None)
        if _is_compiled(mod):
            mod = mod._orig_mod
        if mod is not None and hasattr(mod, "attn_processors"):
            return mod
    raise CaptureError(
        f"cannot find a denoiser in {type(obj).__name__}: expected a diffusers pipeline with a `unet` or "
        "`transformer` (e.g. StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline) "
        "or the denoiser model itself"
    )


def vae_factor(pipe) -> int:
    """Image pixels per latent pixel, per side: the pipeline's ``vae_scale_factor`` (8 where a pipeline
    does not say, as diffusers' pipelines without a VAE assume); 1 for a bare denoiser or None (no VAE:
    its image is its latent)."""
    if pipe is None or hasattr(pipe, "attn_processors"):
        return 1
    return int(getattr(pipe, "vae_scale_factor", None) or 8)


def latent_size_of(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """``(h, w)`` of the latent for an image of ``height`` × ``width`` pixels (each by default the
    denoiser's own sample size): each side over ``vae_factor(pipe)``, as diffusers' pipelines divide it.

    ``pipe``: a pipeline, or a bare denoiser (whose sizes are the latent's).
    """
    f = vae_factor(pipe)
    side = getattr(denoiser_of(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", None) or 64
    sh, sw = (side, side) if isinstance(side, int) else side
    return int(height or sh * f) // f, int(width or sw * f) // f


def _role(module: torch.nn.Module, parent: torch.nn.Module | None) -> str:
    if getattr(module, "add_k_proj", None) is not None and getattr(module, "added_kv_proj_dim", None):
        return "joint"
    if _single_stream(parent):
        return "joint"
    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "self"


def _single_stream(parent: torch.nn.Module | None) -> bool:
    """``parent`` is a block that runs text and image as one sequence (Flux's single-stream block)."""
    return parent is not None and type(parent).__name__.endswith("SingleTransformerBlock")


def is_flux(module: torch.nn.Module | None) -> bool:
    """``module`` is one of diffusers' Flux modules (its transformer, or one of its attentions)."""
    return module is not None and type(module).__name__.startswith("Flux")


def token_packing(denoiser: torch.nn.Module) -> int:
    """Latent pixels per image token, per side, packed by the pipeline before the denoiser sees them:
    2 for Flux (its pipeline folds 2×2 latent patches into one token; its config's patch size is 1)."""
    return 2 if is_flux(denoiser) else 1


def _unet_down_steps(unet) -> tuple[list[int], int]:
    """Number of downsamplings before each down block, and before the mid block."""
    steps, n = [], 0
    for block in unet.down_blocks:
        steps.append(n)
        if getattr(block, "downsamplers", None) is not None:
            n += 1
    return steps, n


def attention_layers(denoiser: torch.nn.Module) -> list[LayerInfo]:
    """Every attention layer of ``denoiser``, in module order (the order diffusers lists processors)."""
    modules = dict(denoiser.named_modules())
    is_unet = hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks")
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    if is_unet:
        down_steps, mid_steps = _unet_down_steps(denoiser)
    layers = []
    for key in denoiser.attn_processors:
        name = key.removesuffix(".processor")
        module = modules[name]
        factor, ceil_steps = None, 0
        if is_unet:
            parts = name.split(".")
            if parts[0] == "down_blocks":
                ceil_steps = down_steps[int(parts[1])]
            elif parts[0] == "up_blocks":
                ceil_steps = down_steps[len(down_steps) - 1 - int(parts[1])]
            elif parts[0] == "mid_block":
                ceil_steps = mid_steps
            else:  # an attention outside the blocks: infer at run time
                ceil_steps = -1
            if ceil_steps >= 0:
                factor = 2**ceil_steps
            else:
                ceil_steps = 0
        elif patch:
            factor = int(patch) * token_packing(denoiser)
        parent = modules.get(name.rpartition(".")[0])
        role = _role(module, parent)
        layers.append(LayerInfo(name, role, int(module.heads), factor, ceil_steps,  # Flux's processor: text first
                                text_first=role == "joint" and is_flux(module), single_stream=_single_stream(parent)))
    return layers


def infer_map_size(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid ``(h, w)`` with ``h * w == n_queries`` and the latent's aspect ratio (for unknown layouts)."""
    h, w = latent_hw
    for k in range(0, 8):
        for hh, ww in ((math.ceil(h / 2**k), math.ceil(w / 2**k)), (h // 2**k, w // 2**k)):
            if hh * ww == n_queries:
                return hh, ww
    side = math.isqrt(n_queries)
    if side * side == n_queries:
        return side, side
    return 1, n_queries

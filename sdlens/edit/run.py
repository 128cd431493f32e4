"""The editing entry points: ``replace``, ``refine``, ``reweight`` and ``inject_self``.

Each runs the base prompt and the edited prompt(s) as one batch from one starting noise (seeded as
a plain ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed))`` would draw it), with
the edit's controllers (and, when asked, a capture) attached to the pipeline's attention layers.
Every argument is checked before any denoising; the pipeline's processors are restored whatever
happens (``sdlens.hooks.attach``).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..capture.controller import Capture
from ..capture.spec import CaptureSpec
from ..errors import EditError
from ..hooks.attach import attach
from ..hooks.layers import attention_layers, denoiser_of, is_flux, latent_size_of
from ..hooks.processor import Controller
from ..result.attention_trace import AttentionTrace
from ..select import check_choice, select_word
from ..tokens import Tokenization, tokenize
from ..vocabulary import renamed
from .align import Alignment, align
from .blend import Blend, BlendMask
from .controllers import CrossEdit, MutualSelfAttention, SelfInject
from .inversion import INVERSIONS, Inversion, invert, null_text
from .steps import window, word_windows

METHODS = ("replace", "refine", "reweight", "inject_self", "mutual")
"""The edit methods (``edit(method=...)``, ``sdlens edit --method``): word swap, words added or removed,
words' attention scaled, the base's self-attention kept, the base's keys and values read (MasaCtrl)."""

# arguments the edit sets itself; passing them would silently change what the edit compares
_RESERVED = ("prompt", "latents", "num_images_per_prompt", "prompt_embeds", "negative_prompt_embeds", "generator")


@dataclass
class EditResult:
    """What an edit returns.

    Attributes:
        images: the base image first (with ``image=``, the reconstruction of that image), then one
            per edited prompt; in the pipeline's ``output_type`` (PIL images by default).
        settings: what was applied, defaults filled in.
        trace: the ``AttentionTrace`` of the run when ``trace`` was asked: one trace whose prompts are
            the branches (``prompt_index=0`` the base, ``1`` the first edit, ...).
        traces: the same, one trace per branch (base first), each with its branch as prompt 0.
        masks: the local blend's last masks ``(edits, 1, h, w)`` at the latent's size (None without blend).
        reconstruction_error: with ``image=``: the mean absolute difference, in 0..1 pixel values,
            between the given image and the base branch's reconstruction of it.
    """

    images: list
    settings: dict
    trace: AttentionTrace | None = None
    masks: torch.Tensor | None = None
    reconstruction_error: float | None = None
    inversion: Inversion | None = field(default=None, repr=False)

    @property
    def traces(self) -> list[AttentionTrace] | None:
        """One trace per branch, base first (views of ``trace``'s maps); None when no trace was asked."""
        if self.trace is None:
            return None
        return [self.trace.of_prompt(k) for k in range(len(self.trace.prompts))]


def _prompts(base, targets) -> tuple[str, list[str]]:
    targets = [targets] if isinstance(targets, str) else list(targets) if targets is not None else []
    for name, p in [("base", base)] + [("target", t) for t in targets]:
        if not isinstance(p, str) or not p.strip():
            raise EditError(f"the {name} prompt must be a non-empty str; got {p!r}")
    if not targets:
        raise EditError("an edit needs at least one target prompt")
    return base, targets


def _weights(weights, targets: list[Tokenization]) -> list[torch.Tensor | None]:
    """``{word: factor}`` as a per-slot factor vector for each target prompt."""
    if weights is None:
        return [None] * len(targets)
    if not isinstance(weights, dict) or not weights:
        raise EditError(f"weights must be a dict {{word: factor}}; got {weights!r}")
    out = []
    for t in targets:
        vec = torch.ones(len(t.ids))
        for word, factor in weights.items():
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not np.isfinite(factor):
                raise EditError(f"weights[{word!r}] must be a finite number; got {factor!r}")
            index = select_word(t, word, what="weights", error=EditError)
            vec[t.word_tokens[index]] = float(factor)
        out.append(vec)
    return out


def _check_processors(denoiser, names: list[str]) -> None:
    procs = denoiser.attn_processors
    bad = sorted({type(procs[f"{n}.processor"]).__name__ for n in names} - {"AttnProcessor2_0", "JointAttnProcessor2_0"})
    if bad:
        raise EditError(f"attention is edited only on diffusers' AttnProcessor2_0 (and SD 3's JointAttnProcessor2_0), "
                        f"and this model's layers run {bad}; pipe.unet.set_attn_processor(AttnProcessor2_0()) installs it")


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _latent_size(pipe, kwargs) -> tuple[int, int]:
    return latent_size_of(pipe, kwargs.get("height"), kwargs.get("width"))


def _noise(pipe, seed: int, latent: tuple[int, int]) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise EditError(f"seed must be an int; got {seed!r}")
    dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else _denoiser(pipe).dtype
    shape = (1, _denoiser(pipe).config.in_channels, *latent)
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=pipe._execution_device,
                        dtype=dtype)


@renamed(kind="method", cross_steps="cross_window", self_steps="self_window")
def edit(pipe, base: str, targets, *, method: str | None, seed: int = 0, cross_window=1.0, self_window=0.0,
         self_max_size: int = 32, mutual: bool = False, blend=None, weights=None, image=None, inversion: str = "ddim",
         trace=False, **pipe_kwargs) -> EditResult:
    """The one function behind ``replace``, ``refine``, ``reweight`` and ``inject_self``.

    ``method`` (one of ``METHODS``): ``"replace"`` or ``"refine"`` (how the edited prompt's
    cross-attention slots align with the base's); ``"reweight"`` (as ``"replace"``, with ``weights``
    required); ``"inject_self"`` or ``"mutual"`` (cross-attention untouched: only ``weights`` may act
    on it; ``"mutual"`` is ``mutual=True``). None is ``"inject_self"``.
    """
    method = "inject_self" if method is None else check_choice(method, METHODS, what="method", error=EditError)
    check_choice(inversion, INVERSIONS, what="inversion", error=EditError)
    if method == "reweight" and not weights:
        raise EditError("method='reweight' scales words' attention: give weights={word: factor}")
    mutual = mutual or method == "mutual"
    kind = {"replace": "replace", "reweight": "replace", "refine": "refine"}.get(method)  # the slots' alignment
    base, targets = _prompts(base, targets)
    _check_pipeline(pipe, pipe_kwargs)
    denoiser = denoiser_of(pipe)
    layers = attention_layers(denoiser)
    joint = any(i.role == "joint" for i in layers)
    if joint and image is not None:
        raise EditError("image= (editing a real image) needs DDIM inversion, which runs on UNet pipelines; "
                        "on a flow-matching SD 3 model edit generated images (seed=)")
    if joint and (window(self_window, "self_window")[1] > window(self_window, "self_window")[0] or mutual):
        raise EditError("self-attention injection (self_window, mutual) runs on UNet pipelines' self-attention "
                        "layers; on a joint-attention (SD 3) model use self_window=0")
    latent = _latent_size(pipe, pipe_kwargs)
    cross_layers = [i for i in layers if i.role in ("cross", "joint")]
    cross_sizes = sorted({max(i.map_size(latent)) for i in cross_layers})

    base_tok = tokenize(base, pipe.tokenizer)
    target_toks = [tokenize(t, pipe.tokenizer) for t in targets]
    weight_vecs = _weights(weights, target_toks)
    settings: dict = {"method": method, "base": base, "targets": targets, "seed": seed}
    # the controllers: each edit's, where it acts (None where it does not), then the capture
    cross = _cross_edit(denoiser, cross_layers, base_tok, target_toks, kind, cross_window, weights, weight_vecs,
                        settings)
    self_edit = _self_edit(denoiser, layers, latent, len(targets), self_window, self_max_size, mutual, settings)
    mask = _blend_mask(blend, [base_tok, *target_toks], cross_sizes, settings)
    capture = _capture(trace)
    controllers: list[Controller] = [c for c in (cross, self_edit, mask, capture) if c is not None]

    call = dict(pipe_kwargs)
    inverted = None
    if image is not None:
        inverted = _inversion(pipe, image, inversion, base, latent, call)
        start = inverted.latent
        settings["image"] = {"size": inverted.size, "inversion": inverted.method}
    else:
        start = _noise(pipe, seed, latent)
    settings.update({k: v for k, v in call.items() if isinstance(v, (int, float, str, bool, type(None)))})
    if mask is not None:
        _blend_after_each_step(call, mask)

    images = _generate(pipe, [base, *targets], start, call, controllers, inverted)
    result = EditResult(images, settings, capture.trace if capture is not None else None,
                        mask.masks if mask is not None else None, inversion=inverted)
    if inverted is not None:
        result.reconstruction_error = inverted.error(result.images[0])
    return result


def _check_pipeline(pipe, pipe_kwargs: dict) -> None:
    """A pipeline sdlens edits (a UNet or SD 3 with a tokenizer, not Flux), and no argument the edit sets itself."""
    reserved = sorted(set(pipe_kwargs) & set(_RESERVED))
    if reserved:
        raise EditError(f"{reserved} cannot be passed to an edit: it sets the prompts and the starting noise itself "
                        "(use seed=, and image= for a real image)")
    if is_flux(_denoiser(pipe)):
        raise EditError(f"{type(pipe).__name__}: Flux is traced (sdlens.trace) but not edited by sdlens.edit, which "
                        "aligns the prompts' words in CLIP's slots while Flux's attention reads T5's; attention edits "
                        "support SD 1.x/2.x/SDXL (UNet) and SD 3 (joint attention) pipelines")
    if _denoiser(pipe) is None or getattr(pipe, "tokenizer", None) is None:
        raise EditError(f"attention edits support SD 1.x/2.x/SDXL (UNet) and SD 3 (joint attention) pipelines; "
                        f"{type(pipe).__name__} has no unet or transformer with a tokenizer")


def _cross_edit(denoiser, cross_layers, base_tok: Tokenization, target_toks: list[Tokenization], kind: str | None,
                cross_window, weights, weight_vecs, settings: dict) -> CrossEdit | None:
    """The cross-attention edit: the targets' slots aligned with the base's (``kind``), their maps copied in
    ``cross_window`` and scaled by ``weights``; None when neither is asked for. Notes it in ``settings``."""
    if kind is None and weights is None:
        settings.update(cross_window=0.0, weights=None)
        return None
    alignments: list[Alignment] = [align(base_tok, t, kind or "refine") for t in target_toks]
    windows = [word_windows(cross_window if kind is not None else 0.0, t) for t in target_toks]
    settings["cross_window"] = cross_window if kind is not None else 0.0
    settings["swapped"] = [a.swapped for a in alignments]
    settings["added"] = [a.added for a in alignments]
    _check_processors(denoiser, [i.name for i in cross_layers])
    settings["weights"] = dict(weights) if weights else None
    return CrossEdit(alignments, windows, weight_vecs)


def _self_edit(denoiser, layers, latent: tuple[int, int], n_targets: int, self_window, self_max_size: int,
               mutual: bool, settings: dict) -> Controller | None:
    """The self-attention edit on the layers of map side ≤ ``self_max_size`` in ``self_window``: the base's
    self-attention injected, or (``mutual``) its keys and values read; None when the window is empty."""
    steps = window(self_window, "self_window")
    if not isinstance(self_max_size, int) or isinstance(self_max_size, bool) or self_max_size < 1:
        raise EditError(f"self_max_size must be a positive int (a map side); got {self_max_size!r}")
    self_layers = [i.name for i in layers if i.role == "self" and max(i.map_size(latent)) <= self_max_size]
    settings.update(self_window=steps, self_max_size=self_max_size, mutual=bool(mutual))
    settings["self_layers"] = self_layers if steps[1] > steps[0] else []
    if steps[1] <= steps[0]:
        return None
    if not self_layers:
        sizes = sorted({max(i.map_size(latent)) for i in layers if i.role == "self"})
        raise EditError(f"no self-attention layer has maps of side ≤ self_max_size={self_max_size}; this model's "
                        f"self-attention map sides at this size: {sizes}")
    _check_processors(denoiser, self_layers)
    cls = MutualSelfAttention if mutual else SelfInject
    return cls(n_targets, steps, self_max_size)


def _blend_mask(blend, toks: list[Tokenization], cross_sizes: list[int], settings: dict) -> BlendMask | None:
    """The local blend's mask maker (None without ``blend``), its words checked in the prompts ``toks``."""
    spec = Blend.of(blend)
    settings["blend"] = asdict(spec) if spec is not None else None
    return None if spec is None else BlendMask(spec, spec.check(toks, cross_sizes))


def _capture(trace) -> Capture | None:
    """A capture of the edit's run with ``trace``'s settings (True: sdlens.trace's defaults), or None."""
    if not trace:
        return None
    if trace is not True and not isinstance(trace, dict):
        raise EditError(f"trace must be True or a dict of sdlens.trace's arguments; got {trace!r}")
    try:
        spec = CaptureSpec() if trace is True else CaptureSpec(**trace)
    except TypeError as e:  # an argument sdlens.trace does not take
        raise EditError(f"trace={trace!r}: {e}; valid: sdlens.trace's keyword arguments") from None
    return Capture(spec)


def _blend_after_each_step(call: dict, mask: BlendMask) -> None:
    """Make the pipeline ``call`` blend its latents with ``mask`` after each step (then run the caller's own
    step callback, if any)."""
    user_callback = call.pop("callback_on_step_end", None)

    def blend_step(p, i, t, kwargs):
        out = {"latents": mask.apply(i, kwargs["latents"])}
        if user_callback is not None:
            out.update(user_callback(p, i, t, {**kwargs, **out}) or {})
        return out

    call["callback_on_step_end"] = blend_step
    call["callback_on_step_end_tensor_inputs"] = ["latents"]


def _generate(pipe, prompts: list[str], start: torch.Tensor, call: dict, controllers: list[Controller],
              inverted: Inversion | None) -> list:
    """The pipeline's pictures of ``prompts`` from the one starting latent ``start``, with the ``controllers``
    attached (and, for a real picture, its DDIM scheduler and null-text embeddings); everything put back."""
    n = len(prompts)
    scheduler = pipe.scheduler
    if inverted is not None:  # sample with the DDIM scheduler the image was inverted for
        pipe.scheduler = inverted.scheduler
    try:
        with ExitStack() as stack:
            if inverted is not None and inverted.null_embeddings is not None:
                stack.enter_context(null_text(pipe.unet, inverted, n_uncond=n))
            if controllers:  # else nothing to hook (an edit with every window empty): a plain batch
                stack.enter_context(attach(pipe, controllers))
            out = pipe(prompts, latents=start.repeat(n, 1, 1, 1), **call)
    finally:
        pipe.scheduler = scheduler
    return list(out.images)


def _inversion(pipe, image, method: str, base: str, latent: tuple[int, int], call: dict) -> Inversion:
    """``image`` inverted with ``base`` by ``method`` (or, given as an ``Inversion``, checked against the
    edit), with ``call``'s steps and guidance set to the inversion's where the caller left them out."""
    null = image.null_embeddings is not None if isinstance(image, Inversion) else method == "null-text"
    if null and call.get("negative_prompt") is not None:
        raise EditError("null-text inversion sets the unconditional embedding itself; drop negative_prompt= "
                        "(or use inversion='ddim')")
    if isinstance(image, Inversion):
        inv = image
        problems = []
        if method == "null-text" and inv.method != "null-text":  # "ddim", the default, defers to the Inversion
            problems.append(f"inversion='null-text' was asked, and it was made by {inv.method!r} "
                            "(make it with sdlens.edit.invert(..., method='null-text'))")
        if inv.prompt is not None and inv.prompt != base:
            problems.append(f"it was inverted with the prompt {inv.prompt!r}, and the base prompt is {base!r}")
        if tuple(inv.latent.shape[-2:]) != tuple(latent):
            problems.append(f"its latent is {tuple(inv.latent.shape[-2:])} and the edit's {tuple(latent)} (height/width)")
        if call.setdefault("num_inference_steps", inv.steps) != inv.steps:
            problems.append(f"it was inverted over {inv.steps} steps, and the edit runs {call['num_inference_steps']}")
        if inv.guidance_scale is not None and call.setdefault("guidance_scale", inv.guidance_scale) != inv.guidance_scale:
            problems.append(f"its null-text embeddings are tuned for guidance {inv.guidance_scale}, and the edit "
                            f"runs {call['guidance_scale']}")
        if problems:
            raise EditError("image= is an Inversion that does not fit this edit: " + "; ".join(problems))
    else:
        call.setdefault("num_inference_steps", _default(pipe, "num_inference_steps", 50))
        call.setdefault("guidance_scale", _default(pipe, "guidance_scale", 7.5))
        inv = invert(pipe, image, base, latent, num_inference_steps=call["num_inference_steps"],
                     guidance_scale=call["guidance_scale"], inversion=method)
    return inv


def _default(pipe, name: str, fallback):
    """The pipeline's own default for a ``__call__`` argument."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


@renamed(cross_steps="cross_window", self_steps="self_window")
def replace(pipe, base: str, target, *, seed: int = 0, cross_window=1.0, self_window=0.0, self_max_size: int = 32,
            blend=None, weights=None, image=None, inversion: str = "ddim", trace=False,
            **pipe_kwargs) -> EditResult:
    """Word swap (Prompt-to-Prompt): the edited prompt's cross-attention maps are the base's.

    Args:
        pipe: a diffusers SD 1.x/2.x/SDXL pipeline (or the built-in model, ``sdlens.load_pipeline()``).
        base: the base prompt. With ``image=`` it describes that image.
        target: the edited prompt (or a list of them), with as many words as ``base``: word ``i`` of
            the target takes the map of word ``i`` of the base (word by word, whatever their token counts).
        seed: the starting noise, as ``pipe(base, generator=torch.Generator("cpu").manual_seed(seed))`` draws it.
        cross_window: when the maps are copied: a step fraction from the start (0.8: the first 80% of
            the steps), a ``(start, end)`` pair of them, or a dict ``{target word: fraction or pair,
            "default": ...}``.
        self_window: when the base's self-attention maps are copied too (sides ≤ ``self_max_size``).
            The defaults (1.0 and 0) did best in ``benchmarks/editing.py`` on the built-in model, whose
            self-attention follows the layout but does not set it (notebook 6); Prompt-to-Prompt's
            published settings for SD 1.x are 0.8 and 0.4.
        blend: local blend: a word, a list of words, a dict or a ``Blend``; only where those words
            are does the edit change the base.
        weights: ``{target word: factor}``: scale those words' attention in the edited branch (a
            negative factor subtracts the word's value: "less of it").
        image: a real image (PIL, ``(H, W, 3)`` array or ``(3, H, W)`` tensor) to edit instead of a
            generated one, inverted with ``base`` first; or an ``Inversion`` made by ``sdlens.edit.invert``
            (to invert once and edit many times).
        inversion: how ``image`` is inverted: ``"ddim"`` (DDIM inversion), or ``"null-text"`` (then the
            unconditional embedding tuned per step, so that the reconstruction holds at high guidance).
        trace: True (or a dict of ``sdlens.trace`` arguments) to capture the run's attention.
        **pipe_kwargs: passed to the pipeline (``num_inference_steps``, ``guidance_scale``, ``height``, ...).

    Returns an ``EditResult``: ``.images`` (base first), ``.settings``, ``.trace``, ``.masks``.

    Example::

        result = sdlens.edit.replace(pipe, "a red circle", "a blue circle", seed=3)
        result.images[0], result.images[1]   # the base, and the same scene with a blue circle
    """
    same = [t for t in ([target] if isinstance(target, str) else list(target or []))
            if isinstance(t, str) and isinstance(base, str) and t.lower().split() == base.lower().split()]
    if same and not weights:
        raise EditError(f"the target {same[0]!r} is the base prompt word for word: replace has nothing to swap and "
                        "would give the base image back; change a word, or use reweight(pipe, prompt, {word: factor})")
    return edit(pipe, base, target, method="replace", seed=seed, cross_window=cross_window, self_window=self_window,
                self_max_size=self_max_size, blend=blend, weights=weights, image=image, inversion=inversion,
                trace=trace, **pipe_kwargs)


@renamed(cross_steps="cross_window", self_steps="self_window")
def refine(pipe, base: str, target, *, seed: int = 0, cross_window=1.0, self_window=0.0, self_max_size: int = 32,
           blend=None, weights=None, image=None, inversion: str = "ddim", trace=False,
           **pipe_kwargs) -> EditResult:
    """Refinement (Prompt-to-Prompt): words added to or removed from the base prompt.

    The words both prompts share keep the base's maps; added words keep their own. Arguments as
    ``replace``.
    """
    return edit(pipe, base, target, method="refine", seed=seed, cross_window=cross_window, self_window=self_window,
                self_max_size=self_max_size, blend=blend, weights=weights, image=image, inversion=inversion,
                trace=trace, **pipe_kwargs)


@renamed(cross_steps="cross_window", self_steps="self_window")
def reweight(pipe, prompt: str, weights: dict, *, seed: int = 0, cross_window=1.0, self_window=0.0,
             self_max_size: int = 32, blend=None, image=None, inversion: str = "ddim", trace=False,
             **pipe_kwargs) -> EditResult:
    """Attention reweighting (Prompt-to-Prompt's equalizer): ``prompt`` again, with the attention of
    the words in ``weights`` (``{"big": 2.0}``) scaled in the edited branch; the base's maps are
    kept for ``cross_window`` and its self-attention for ``self_window``, so the scene stays."""
    return edit(pipe, prompt, prompt, method="reweight", seed=seed, cross_window=cross_window, self_window=self_window,
                self_max_size=self_max_size, blend=blend, weights=weights, image=image, inversion=inversion,
                trace=trace, **pipe_kwargs)


@renamed(self_steps="self_window")
def inject_self(pipe, base: str, target, *, seed: int = 0, self_window=0.5, self_max_size: int = 32,
                mutual: bool = False, blend=None, weights=None, image=None, inversion: str = "ddim",
                trace=False, **pipe_kwargs) -> EditResult:
    """Self-attention injection (Free-Prompt-Editing): the base's self-attention maps (sides ≤
    ``self_max_size``) are copied into the edited branch for ``self_window``; cross-attention is
    left alone, so any target prompt works. ``mutual=True``: instead, the edited branch's queries
    read the base's keys and values (MasaCtrl's mutual self-attention)."""
    return edit(pipe, base, target, method="mutual" if mutual else "inject_self", seed=seed, self_window=self_window,
                self_max_size=self_max_size, blend=blend, weights=weights, image=image, inversion=inversion,
                trace=trace, **pipe_kwargs)


__all__ = ["METHODS", "EditResult", "edit", "inject_self", "refine", "replace", "reweight"]

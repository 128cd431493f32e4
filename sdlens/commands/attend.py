"""What ``sdlens attend PROMPT`` does: generate one image with attention traced, and draw it.

Everything that can be wrong with the arguments (a word not in the prompt, a model folder that is
not there, a size the model cannot take) is checked before the image is generated, and raises
``AttendError`` with one line saying what to do. The files are written into a temporary folder
beside ``out`` and moved into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import CaptureError, CommandError
from ..files import staged_folder
from ..select import check_step_count, select_word, word_occurrences
from ..vocabulary import renamed

STOP_WORDS = frozenset("a an the on in at of and or to with is are under over above below".split())


class AttendError(CommandError):
    """An argument of ``sdlens attend`` that cannot work; the message is one line for the user."""


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe form of ``text``: lower case, ``a-z0-9`` and dashes.

    >>> slug("A red circle, on the LEFT!")
    'a-red-circle-on-the-left'
    """
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "prompt"


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """An image size from ``--size``: one number, or height x width; None stays None.

    >>> parse_size("64"), parse_size("64x96")
    ((64, 64), (64, 96))
    """
    if text is None:
        return None
    if isinstance(text, int):
        return (text, text)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×,]\s*(\d+)\s*)?", str(text))
    if not m:
        raise AttendError(f"--size {text!r} is not a size: give one number (64) or height x width (64x96)")
    h = int(m.group(1))
    return (h, int(m.group(2)) if m.group(2) else h)


def check_model_name(model: str) -> None:
    """Raise ``AttendError`` for a model that is certainly not loadable, before loading anything."""
    from ..models.load import BUILTIN

    if model in BUILTIN:
        if not (BUILTIN[model] / "model_index.json").exists():
            raise AttendError(
                f"the built-in model {model!r} is not installed ({BUILTIN[model]} has no model_index.json): "
                "pass --model FOLDER or a hub id, or train it with `sdlens train-tiny`"
            )
        return
    path = Path(model).expanduser()
    looks_local = (
        path.exists()
        or model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or (model.count("/") == 1 and Path(model.split("/")[0]).is_dir())
    )
    if not looks_local:
        return  # a hub id: diffusers decides
    if not path.is_dir():
        raise AttendError(f"no model folder {model!r}: give a diffusers pipeline folder, a hub id, 'tiny' or 'tiny-sd3'")
    if not (path / "model_index.json").exists():
        raise AttendError(f"{model!r} is not a diffusers pipeline folder (it has no model_index.json)")


def size_multiple(pipe) -> int:
    """The number that image sides must be a multiple of for ``pipe`` (8, the VAE factor, the patch size)."""
    from ..hooks.layers import denoiser_of, vae_factor

    patch = int(getattr(denoiser_of(pipe).config, "patch_size", None) or 1)
    return math.lcm(8, vae_factor(pipe) * patch)


def default_size(pipe) -> tuple[int, int]:
    """The image size ``pipe`` makes by default: its denoiser's sample size times the VAE's factor."""
    from ..hooks.layers import latent_size_of, vae_factor

    f = vae_factor(pipe)
    h, w = latent_size_of(pipe)
    return (h * f, w * f)


def check_size(pipe, size: tuple[int, int] | None) -> tuple[int, int]:
    size = size or default_size(pipe)
    k = size_multiple(pipe)
    h, w = size
    if h <= 0 or w <= 0 or h % k or w % k:
        raise AttendError(
            f"--size {h}x{w} does not fit this model: height and width must be positive multiples of {k} "
            f"(its own size is {'x'.join(map(str, default_size(pipe)))})"
        )
    return size


def check_words(pipe, prompt: str, words: Sequence[str] | None) -> list[int]:
    """Word indices of ``words`` in the prompt (all words when None); a word not in it raises."""
    from ..tokens import tokenize

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise AttendError("this pipeline has no CLIP tokenizer, so its prompts' words cannot be found")
    tok = tokenize(prompt, tokenizer)
    if words is None:
        return list(range(len(tok.words)))
    out = []
    for w in words:  # every occurrence of a word, or the one a label ("red (2)") names
        found = word_occurrences(tok, w) or [select_word(tok, w, what="--words", error=AttendError)]
        out += [i for i in found if i not in out]
    return out


def load(model: str, device: str | None, progress: bool):
    from ..models.load import load_pipeline

    check_model_name(model)
    try:  # load_pipeline keeps diffusers' and transformers' loading bars and advice quiet
        pipe = load_pipeline(model, device=device)
    except Exception as e:  # diffusers/hub errors: report in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttendError(f"could not load model {model!r}: {first}") from None
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


@renamed(steps="num_inference_steps", guidance="guidance_scale", negative="negative_prompt")
def attend(
    prompt: str,
    *,
    model: str = "tiny",
    num_inference_steps: int = 25,
    seed: int = 0,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    size=None,
    words: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    self_attn: bool = False,
    concepts: Sequence[str] | None = None,
    text_attn: bool = False,
    progress: bool = True,
    pipe=None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Generate ``prompt`` with attention traced; write the image, word maps, GIF and trace into ``out``.

    Returns the paths written (in ``out``):

    - ``image.png``: the generated image;
    - ``words.png``: the image and one map per word, with the start/end/padding slots and each
      one's share of the attention;
    - ``word-II-WORD.png``: one overlay per word (``II``: its index in the prompt's words);
    - ``steps.gif``: the maps over the denoising steps (beside the image being denoised when the
      trace records it);
    - ``concepts.png`` (with ``concepts``, SD 3-style models): one ConceptAttention map per concept;
      ``concepts-attention.png``: where each concept token looks in the image;
    - ``directions.png`` (with ``text_attn``, SD 3-style models): each chosen word's map read both
      ways through joint attention (pixels → word, word → pixels, where both agree);
    - ``trace.safetensors``: the trace, for ``sdlens.load_trace``.
    """
    prompt = (prompt or "").strip()
    if not prompt:
        raise AttendError("the prompt is empty")
    check_step_count(num_inference_steps, what="--num-inference-steps", error=AttendError)
    if guidance_scale < 0:
        raise AttendError(f"--guidance-scale {guidance_scale}: must be >= 0 (1 turns classifier-free guidance off)")
    size = parse_size(size)
    out = Path(out) if out is not None else Path(f"attend-{slug(prompt)}")
    if out.exists() and not out.is_dir():
        raise AttendError(f"--out {str(out)!r} is a file, not a folder")
    if pipe is None:
        pipe = load(model, device, progress)
    height, width = check_size(pipe, size)
    chosen = check_words(pipe, prompt, words)
    concepts = check_concepts(pipe, concepts)
    if text_attn:
        check_joint(pipe, "--text-attn")

    trace, image = generate(pipe, prompt, num_inference_steps=num_inference_steps, seed=seed,
                            guidance_scale=guidance_scale, negative_prompt=negative_prompt, size=(height, width),
                            self_attn=self_attn, concepts=concepts, text_attn=text_attn)
    return write_outputs(trace, image, out, chosen, gif_words=_gif_words(trace, chosen, words), log=log)


def check_concepts(pipe, concepts: Sequence[str] | None) -> list[str] | None:
    """``--concepts`` as a list of words, refused (before generating) where the model has no joint attention."""
    if not concepts:
        return None
    from ..capture.concepts import check_concepts as check

    check_joint(pipe, "--concepts")
    try:
        return check(concepts)
    except CaptureError as e:
        raise AttendError(f"--concepts: {e}") from None


def check_joint(pipe, option: str) -> None:
    """Refuse ``option`` (before generating) where the model has no joint attention."""
    from ..hooks.layers import attention_layers, denoiser_of

    if not any(i.role == "joint" for i in attention_layers(denoiser_of(pipe))):
        raise AttendError(f"{option} needs a model with joint attention (SD 3 family, e.g. --model tiny-sd3); "
                          "this model has cross-attention: its word maps are the ones to read")


@renamed(steps="num_inference_steps", guidance="guidance_scale", negative="negative_prompt")
def generate(pipe, prompt, *, num_inference_steps, seed, guidance_scale, negative_prompt, size, self_attn=False,
             concepts=None, text_attn=False):
    """One traced generation: ``(trace, PIL image)``."""
    import torch

    from .. import capture

    kw = dict(self_attn=self_attn, record_latents=True, concepts=concepts, text_attn=text_attn)
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    with capture.trace(pipe, **kw) as tr:
        result = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size[0],
            width=size[1],
            generator=generator,
        )
    return tr, result.images[0]


def _gif_words(trace, chosen: list[int], given) -> list[int]:
    if given is not None:
        return chosen[:6]
    words = trace.words()
    content = [i for i in chosen if words[i].strip(",.;:!?").lower() not in STOP_WORDS]
    return (content or chosen)[:6]


def write_outputs(trace, image, out: Path, words: list[int], *, gif_words=None, log=print) -> list[Path]:
    """Write the pictures and the trace into a temporary folder, then move them into ``out``."""
    from ..viz.animation import animate
    from ..viz.heatmaps import concept_grid, direction_grid, overlay, word_grid

    out = Path(out)
    with staged_folder(out, prefix=".sdlens-attend-") as (tmp, names):

        def save_fig(fig, name):
            fig.savefig(tmp / name, dpi=120)
            names.append(name)

        image.save(tmp / "image.png")
        names.append("image.png")
        save_fig(word_grid(trace, image, words=words), "words.png")
        if trace.concepts:
            save_fig(concept_grid(trace, image), "concepts.png")
            save_fig(concept_grid(trace, image, space="attention"), "concepts-attention.png")
        if "text_image" in trace.kinds:
            save_fig(direction_grid(trace, image, words=words), "directions.png")
        all_words = trace.words()
        for i in words:
            save_fig(overlay(trace, i, image), f"word-{i:02d}-{slug(all_words[i], 24)}.png")
        animate(trace, gif_words or words, tmp / "steps.gif", image, side=128)
        names.append("steps.gif")
        trace.save(tmp / "trace.safetensors")
        names.append("trace.safetensors")
    paths = [out / n for n in names]
    for p in paths:
        log(str(p))
    return paths

"""Loading pipelines: the built-in tiny model, a folder made by `sdlens train-tiny`, or anything diffusers loads.

>>> import sdlens
>>> pipe = sdlens.load_pipeline()                          # doctest: +SKIP
>>> image = pipe("a red circle on the left").images[0]     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from ..errors import ModelError

TINY_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "tiny"
"""Where the built-in model's weights are installed with the package (a StableDiffusionPipeline folder)."""

TINY_SD3_DIR: Path = TINY_DIR.parent / "tiny-sd3"
"""The second built-in model, SD 3's design (a StableDiffusion3Pipeline folder; ``sdlens.models.mmdit``)."""

BUILTIN: dict[str, Path] = {"tiny": TINY_DIR, "tiny-sd3": TINY_SD3_DIR}
"""The built-in models by name: "tiny" (UNet, SD 1.x's design) and "tiny-sd3" (MMDiT, SD 3's design)."""

_TRAIN_HINT = {
    "tiny": "sdlens train-tiny --out runs/tiny",
    "tiny-sd3": "sdlens train-tiny --arch sd3 --out runs/tiny-sd3",
}

# What `scheduler=` accepts by name: diffusers class names, or these short names.
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def load_pipeline(
    name: str | os.PathLike = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    scheduler=None,
    progress: bool | None = None,
    **kwargs,
):
    """A diffusers pipeline, ready to call.

    name:      "tiny" (default): the built-in model shipped in the package (`TINY_DIR`), 64x64
               images, loaded with no network; "tiny-sd3": the built-in model of SD 3's design
               (a pure transformer with joint attention, `TINY_SD3_DIR`). A path to a folder: a
               `sdlens train-tiny` output or
               any diffusers pipeline folder, loaded locally. Anything else (a hub id such as
               "stable-diffusion-v1-5/stable-diffusion-v1-5") goes to
               `diffusers.DiffusionPipeline.from_pretrained` with `kwargs`.
    device:    where to put it; default "cuda" when available, else "cpu".
    dtype:     torch.float32 (default) or torch.float16 (on a GPU; it runs on a CPU too, slowly).
    scheduler: None keeps the pipeline's own; a name ("ddim", "dpm", "euler", "pndm", ... or a
               diffusers class name), a scheduler class, or a scheduler instance replaces it,
               built from the pipeline's noise-schedule config.
    progress:  show the sampling progress bar; default: off for the tiny model (it takes about
               a second), on otherwise.
    """
    from diffusers import DiffusionPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    is_tiny = isinstance(name, str) and name in BUILTIN
    if is_tiny:
        folder: Path | None = BUILTIN[name]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"the built-in model {name!r} has no weights: {folder} has no model_index.json. "
                f"Train them with `{_TRAIN_HINT[name]}` and copy that folder's model files "
                f"(model_index.json and the component folders, not train/) to {folder}, "
                f"or load the folder directly with load_pipeline('runs/...')."
            )
    else:
        if isinstance(name, str) and name.startswith("tiny") and not Path(name).exists():
            raise ModelError(f"unknown built-in model {name!r}; the built-in models are {', '.join(BUILTIN)}")
        folder = Path(name) if Path(name).is_dir() else None
        if folder is None and isinstance(name, str) and name.startswith(("/", "./", "../", "~")):
            raise ModelError(f"no folder {name!r}; give a diffusers pipeline folder, a hub id, or a built-in model "
                             f"({', '.join(BUILTIN)})")

    if folder is not None:
        if not (folder / "model_index.json").exists():
            raise ModelError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                f"`sdlens train-tiny --out {folder}` writes one"
            )
        kwargs.setdefault("local_files_only", True)
        for component in _absent_components(folder):  # SD 3 without T5: diffusers wants them named as None
            kwargs.setdefault(component, None)
    if is_tiny:
        # a 25 MB model needs no accelerate; without this, diffusers advises installing it on every load
        kwargs.setdefault("low_cpu_mem_usage", False)
    with _quiet_loading(progress):
        pipe = DiffusionPipeline.from_pretrained(str(folder or name), **{_DTYPE: dtype}, **kwargs)

    if scheduler is not None:
        pipe.scheduler = _make_scheduler(scheduler, pipe.scheduler.config)
    pipe = pipe.to(device)
    if progress is None:
        progress = not _is_small(pipe)
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="sampling")
    return pipe


@contextlib.contextmanager
def _quiet_loading(progress: bool | None):
    """Hide the loading bars and library advice (accelerate, torchvision) that clutter a notebook cell."""
    import diffusers
    import transformers

    d_level, t_level = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    if not progress:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.logging.set_verbosity(d_level)
        transformers.logging.set_verbosity(t_level)
        if not progress:
            diffusers.utils.logging.enable_progress_bar()
            transformers.utils.logging.enable_progress_bar()


def _dtype_keyword() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (0.36); use the name this version knows."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present once `dtype` exists)
    except ImportError:
        return "torch_dtype"
    return "dtype"


_DTYPE = _dtype_keyword()


def _absent_components(folder: Path) -> list[str]:
    """Components a pipeline folder lists as absent (``[null, null]``), e.g. an SD 3 saved without T5."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    return [k for k, v in index.items() if not k.startswith("_") and v == [None, None]
            and k not in ("safety_checker", "feature_extractor", "image_encoder")]


def _is_small(pipe) -> bool:
    """True for pipelines whose latents are at most 32x32 (the tiny models: 16x16): a run takes about a second."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return denoiser is not None and int(getattr(denoiser.config, "sample_size", 64) or 64) <= 32


def _make_scheduler(scheduler, config):
    import diffusers

    if isinstance(scheduler, str):
        class_name = SCHEDULERS.get(scheduler.lower(), scheduler)
        cls = getattr(diffusers, class_name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelError(
                f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}, a diffusers scheduler "
                f"class name, a scheduler class or an instance"
            )
        return cls.from_config(config)
    if isinstance(scheduler, type):
        return scheduler.from_config(config)
    return scheduler

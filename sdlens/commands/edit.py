"""What ``sdlens edit BASE TARGET`` does: run an attention edit and write the pictures.

Every argument is checked before any denoising (``sdlens.edit`` raises ``EditError`` there); the
files go into a temporary folder beside ``out`` and are moved into place at the end, so a failed
run leaves nothing written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..edit.inversion import INVERSIONS
from ..edit.run import METHODS
from ..errors import CommandError
from ..files import staged_folder
from ..select import check_choice, check_step_count
from ..vocabulary import renamed
from .attend import check_model_name, check_size, load, parse_size, slug


class EditCommandError(CommandError):
    """An argument of ``sdlens edit`` that cannot work; the message is one line for the user."""


def parse_window(text: str, name: str):
    """``"0.8"`` → 0.8; ``"0.2,0.8"`` → (0.2, 0.8)."""
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise EditCommandError(f"{name} {text!r}: give a fraction (0.8) or start,end (0.2,0.8)") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise EditCommandError(f"{name} {text!r}: give a fraction (0.8) or start,end (0.2,0.8)")


def parse_pairs(items: Sequence[str] | None, name: str, value: Callable) -> dict:
    """``["big=2", "red=0.5"]`` → ``{"big": 2.0, "red": 0.5}``."""
    out = {}
    for item in items or []:
        word, sep, v = item.partition("=")
        if not sep or not word.strip():
            raise EditCommandError(f"{name} {item!r}: give WORD=VALUE, e.g. big=2")
        out[word.strip()] = value(v, f"{name} {item}")
    return out


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EditCommandError(f"{name}: {text!r} is not a number") from None


def load_image(path: str | None):
    if path is None:
        return None
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise EditCommandError(f"--image {path!r}: no such file")
    try:
        return Image.open(p).convert("RGB")
    except OSError as e:
        raise EditCommandError(f"--image {path!r} is not an image PIL can read ({e})") from None


@renamed(steps="num_inference_steps", guidance="guidance_scale", cross_steps="cross_window",
         word_steps="word_windows", self_steps="self_window")
def run_edit(
    base: str,
    target: str | None,
    *,
    method: str = "replace",
    model: str = "tiny",
    out: str | os.PathLike | None = None,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    size=None,
    cross_window: str | None = None,
    word_windows: Sequence[str] | None = None,
    self_window: str | None = None,
    blend: Sequence[str] | None = None,
    threshold: float | None = None,
    weights: Sequence[str] | None = None,
    image: str | None = None,
    inversion: str = "ddim",
    trace: bool = False,
    device: str | None = None,
    progress: bool = True,
    pipe=None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run one edit and write into ``out``: ``side.png`` (base and edited, side by side, titled),
    ``base.png``, ``edit.png``, ``mask.png`` (with a blend), ``settings.json``, and with ``trace``
    ``words-base.png``, ``words-edit.png`` (each branch's word maps) and ``trace.safetensors``."""
    from .. import edit as sdedit

    check_choice(method, METHODS, what="--method", error=EditCommandError)
    base = (base or "").strip()
    target = (target or "").strip() or (base if method == "reweight" else "")
    if not base or not target:
        raise EditCommandError("give a base prompt and a target prompt (reweight may leave the target out)")
    if method == "reweight" and target != base:
        raise EditCommandError("--method reweight edits one prompt: leave TARGET out or repeat BASE")
    check_step_count(num_inference_steps, what="--num-inference-steps", error=EditCommandError)
    out = Path(out) if out is not None else Path(f"edit-{slug(base, 20)}-to-{slug(target, 20)}")
    if out.exists() and not out.is_dir():
        raise EditCommandError(f"--out {str(out)!r} is a file, not a folder")
    kwargs: dict = {}
    if cross_window is not None or word_windows:
        cw = parse_window(cross_window, "--cross-window") if cross_window is not None else 1.0
        if word_windows:
            cw = {"default": cw, **parse_pairs(word_windows, "--word-windows", parse_window)}
        kwargs["cross_window"] = cw
    if self_window is not None:
        kwargs["self_window"] = parse_window(self_window, "--self-window")
    if blend:
        kwargs["blend"] = {"words": list(blend)} | ({} if threshold is None else {"threshold": threshold})
    elif threshold is not None:
        raise EditCommandError("--threshold sets the local blend's mask: give --blend WORD too")
    w = parse_pairs(weights, "--weights", _number)
    if method == "reweight" and not w:
        raise EditCommandError("--method reweight needs --weights WORD=FACTOR")
    if w:
        kwargs["weights"] = w
    check_choice(inversion, INVERSIONS, what="--inversion", error=EditCommandError)
    if inversion != "ddim" and image is None:
        raise EditCommandError("--inversion sets how --image is inverted: give --image FILE too")
    picture = load_image(image)
    if pipe is None:
        check_model_name(model)
        pipe = load(model, device, progress)
    height, width = check_size(pipe, parse_size(size)) if picture is None or size else (picture.height, picture.width)
    call = dict(seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                image=picture, trace=trace, **kwargs)
    if picture is not None:
        call["inversion"] = inversion
    if method == "reweight":
        result = sdedit.reweight(pipe, base, call.pop("weights"), **call)
    elif method in ("inject_self", "mutual"):
        call.pop("cross_window", None)
        result = sdedit.inject_self(pipe, base, target, mutual=method == "mutual", **call)
    else:
        result = getattr(sdedit, method)(pipe, base, target, **call)
    return write_outputs(result, out, method, log=log)


def write_outputs(result, out: Path, method: str, *, log=print) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..viz.heatmaps import word_grid

    out = Path(out)
    with staged_folder(out, prefix=".sdlens-edit-") as (tmp, names):
        base, edited = result.images[0], result.images[1]
        base.save(tmp / "base.png")
        edited.save(tmp / "edit.png")
        names += ["base.png", "edit.png"]
        s = result.settings
        panels = [(base, ("reconstruction: " if "image" in s else "base: ") + s["base"]),
                  (edited, f"{method}: " + s["targets"][0])]
        if result.masks is not None:
            mask = result.masks[0, 0].float().numpy()
            panels.append((mask, "local blend mask (edited where white)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
        for ax, (im, title) in zip(np.atleast_1d(axes), panels):
            ax.imshow(im, cmap="gray" if isinstance(im, np.ndarray) else None, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8, wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(tmp / "side.png", dpi=120)
        plt.close(fig)
        names.append("side.png")
        if result.masks is not None:
            from PIL import Image

            Image.fromarray((result.masks[0, 0].numpy() * 255).astype(np.uint8)).save(tmp / "mask.png")
            names.append("mask.png")
        if result.trace is not None:
            for k, (name, im) in enumerate((("words-base.png", base), ("words-edit.png", edited))):
                fig = word_grid(result.trace, im, prompt_index=k)
                fig.savefig(tmp / name, dpi=120)
                plt.close(fig)
                names.append(name)
            result.trace.save(tmp / "trace.safetensors")
            names.append("trace.safetensors")
        settings = {k: v for k, v in s.items() if k != "self_layers"} | {"method": method}
        if result.reconstruction_error is not None:
            settings["reconstruction_error"] = result.reconstruction_error
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1, default=str) + "\n")
        names.append("settings.json")
    paths = [out / n for n in names]
    for p in paths:
        log(str(p))
    return paths


__all__ = ["METHODS", "EditCommandError", "run_edit"]

"""The batch's row layout: which row of the denoiser's batch is which prompt, image and kind.

diffusers pipelines put the unconditional half of a classifier-free-guidance batch first, and
Perturbed-Attention Guidance (PAG) appends its perturbed branch:
``[uncond × P, cond × P, perturbed × P]`` (P = prompts × images per prompt, prompt-major), each
part present when its guidance is on. Capture keeps the rows its spec asks for; editing pairs a
base prompt's rows with an edited prompt's rows. A batch that fits no such layout is refused
(``CaptureError``): a wrong label would give a wrong map without a word of warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CaptureError

HALVES = ("uncond", "cond", "perturbed")
"""The kinds of row, in batch order: unconditional, conditional, and Perturbed-Attention Guidance's
perturbed branch (the conditional input run with some self-attention layers replaced by the identity)."""


@dataclass(frozen=True)
class Row:
    """One row of the denoiser's batch: which CFG half, prompt and image it is."""

    half: str  # "uncond", "cond" or "perturbed"
    prompt: int
    image: int


@dataclass(frozen=True)
class RowLayout:
    """Every row of one run's batch, in batch order, with the prompts they came from.

    ``rows[i]`` is batch row ``i``. ``cfg``: the batch holds an unconditional part (first);
    ``pag``: it holds PAG's perturbed part (last).
    """

    rows: tuple[Row, ...]
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    images_per_prompt: int
    cfg: bool
    pag: bool = False

    @property
    def per_half(self) -> int:
        """Rows of each part (P: prompts × images)."""
        return len(self.rows) // (1 + self.cfg + self.pag)

    def indices(self, halves: Sequence[str]) -> list[int]:
        """Batch indices of the rows of ``halves`` (in the order given), each half prompt-major."""
        return [i for half in halves for i, r in enumerate(self.rows) if r.half == half]


def _as_list(x) -> list | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def row_layout(batch: int, call: dict | None, cfg: bool | None, pag: bool = False) -> RowLayout:
    """The layout of a batch of ``batch`` rows.

    ``call``: what the pipeline's ``encode_prompt`` was given (``prompt``, ``negative_prompt``,
    ``num_images_per_prompt``), or ``{"prompt": ...}`` from ``sdlens.trace(prompt=...)``, or None;
    ``cfg``: the run uses classifier-free guidance (None: unknown, told from the batch and the
    prompts); ``pag``: it uses Perturbed-Attention Guidance. Raises ``CaptureError`` when the
    batch fits no layout these allow.
    """
    call = call or {}
    prompts = _as_list(call.get("prompt"))
    n_img = int(call.get("num_images_per_prompt", 1) or 1)
    per = len(prompts) * n_img if prompts else None
    if cfg is None:  # a denoiser called directly, or by a pipeline other than the traced one
        if per is None and batch == 1:
            cfg = False
        elif per is not None and batch in (per, 2 * per):
            cfg = batch == 2 * per
        else:
            known = f"{len(prompts)} prompt(s) × {n_img} image(s)" if prompts else "no prompts"
            raise CaptureError(
                f"cannot tell which rows of the denoiser's batch of {batch} are which ({known} known): the "
                "denoiser was called directly or by a pipeline other than the traced one. Pass the prompts "
                "with sdlens.trace(..., prompt=[...]), or trace the pipeline that runs"
            )
    halves = (("uncond",) if cfg else ()) + ("cond",) + (("perturbed",) if pag else ())
    if per is None:
        per = batch // len(halves)
        if n_img > 1 and per % n_img:
            n_img = 1
    if batch != per * len(halves):
        raise CaptureError(
            f"the denoiser's batch has {batch} rows, but {', '.join(halves)} parts of {per} rows "
            f"({len(prompts) if prompts else '?'} prompt(s) × {n_img} image(s)) make {per * len(halves)}: "
            "this pipeline lays out its batch in a way sdlens cannot label; trace its denoiser with "
            "sdlens.trace(pipe.unet, prompt=...) and cfg='cond' only if you know the rows"
        )
    rows = tuple(Row(half, i // n_img, i % n_img) for half in halves for i in range(per))
    neg = _as_list(call.get("negative_prompt"))
    if cfg and prompts:
        if neg is None:
            neg = [""] * len(prompts)
        elif len(neg) == 1 and len(prompts) > 1:
            neg = neg * len(prompts)
    else:
        neg = None
    return RowLayout(rows, tuple(prompts or ()), None if neg is None else tuple(neg), n_img, cfg, pag)


__all__ = ["HALVES", "Row", "RowLayout", "row_layout"]

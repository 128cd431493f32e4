"""The batch's row layout: which row of the denoiser's batch is which prompt, image and CFG half.

diffusers pipelines put the unconditional half of a classifier-free-guidance batch first:
``[uncond × prompts·images, cond × prompts·images]``, each half prompt-major. Capture keeps the
rows its spec asks for; editing pairs a base prompt's rows with an edited prompt's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HALVES = ("uncond", "cond")


@dataclass(frozen=True)
class Row:
    """One row of the denoiser's batch: which CFG half, prompt and image it is."""

    half: str  # "cond" or "uncond"
    prompt: int
    image: int


@dataclass(frozen=True)
class RowLayout:
    """Every row of one run's batch, in batch order, with the prompts they came from.

    ``rows[i]`` is batch row ``i``. ``cfg``: the batch holds both halves (uncond first).
    """

    rows: tuple[Row, ...]
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    images_per_prompt: int
    cfg: bool

    @property
    def per_half(self) -> int:
        return len(self.rows) // 2 if self.cfg else len(self.rows)

    def indices(self, halves: Sequence[str]) -> list[int]:
        """Batch indices of the rows of ``halves`` (in the order given), each half prompt-major."""
        return [i for half in halves for i, r in enumerate(self.rows) if r.half == half]


def _as_list(x) -> list | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def row_layout(batch: int, call: dict | None, pipe_cfg: bool) -> RowLayout:
    """The layout of a batch of ``batch`` rows.

    ``call``: what the pipeline's ``encode_prompt`` was given (``prompt``, ``negative_prompt``,
    ``num_images_per_prompt``), or None when the denoiser is called directly; ``pipe_cfg``: the
    pipeline says it runs classifier-free guidance (used only when the prompts do not tell).
    """
    call = call or {}
    prompts = _as_list(call.get("prompt"))
    n_img = call.get("num_images_per_prompt", 1)
    per_half = len(prompts) * n_img if prompts else None
    if per_half and batch == 2 * per_half:
        cfg = True
    elif per_half and batch == per_half:
        cfg = False
    else:
        cfg = pipe_cfg and batch % 2 == 0
        per_half = batch // 2 if cfg else batch
        n_img = n_img if prompts and per_half == len(prompts) * n_img else 1
    halves = HALVES if cfg else ("cond",)
    rows = tuple(Row(half, i // n_img, i % n_img) for half in halves for i in range(per_half))
    neg = _as_list(call.get("negative_prompt"))
    if cfg and prompts:
        if neg is None:
            neg = [""] * len(prompts)
        elif len(neg) == 1 and len(prompts) > 1:
            neg = neg * len(prompts)
    else:
        neg = None
    return RowLayout(rows, tuple(prompts or ()), None if neg is None else tuple(neg), n_img, cfg)


__all__ = ["HALVES", "Row", "RowLayout", "row_layout"]

"""The edits as controllers on the hook layer (``sdlens.hooks``).

The batch of an edit holds the base prompt first, then the edited prompt(s), in each half of
classifier-free guidance: ``[uncond: base, edit₁, …, cond: base, edit₁, …]``. Each controller
reads the rows it needs from the run's row layout and changes only the edited rows, so the base
branch is computed exactly as a plain generation would compute it.

- ``CrossEdit`` (Prompt-to-Prompt's replace and refine, and its reweighting): at the ``probs``
  point of the cross-attention layers, an edited row becomes ``α·(p_base @ M) + (1-α)·p_edit``,
  per target slot (``α`` = 1 where the slot is aligned and its window holds this step), then
  chosen slots are scaled by their weights. Conditional half only, as in Prompt-to-Prompt: the
  unconditional rows all read the same empty prompt. On a joint (SD 3) layer the same is done to
  the image queries' probabilities over the prompt's (CLIP) slots; since there a pixel's
  attention is shared with the image's keys, the copied maps keep the edited row's own share of
  text attention at each pixel (``p_base @ M`` rescaled to the row's mass on those slots): the
  base's distribution over the words, not its image-versus-text balance.
- ``SelfInject`` (Free-Prompt-Editing's self-attention injection): at the ``probs`` point of
  self-attention layers up to a map side, the edited rows get the base row's probabilities.
- ``MutualSelfAttention`` (MasaCtrl): at the ``qkv`` point of the same layers, the edited rows'
  queries read the base row's keys and values (SDPA stays in use: no probabilities are formed).

Steps outside a controller's window leave it inactive, and the layer then runs diffusers' own
SDPA computation.
"""

from __future__ import annotations

import torch

from ..errors import EditError
from ..hooks.processor import Call, Controller
from ..hooks.rows import RowLayout
from ..hooks.run import Run
from .align import Alignment
from .steps import Window, in_window


def branch_rows(layout: RowLayout, n_branches: int, halves: tuple[str, ...]) -> list[tuple[int, list[int]]]:
    """For each half in ``halves`` the batch holds: ``(base row, [edited rows])``."""
    if layout.pag:
        raise EditError("attention edits do not support Perturbed-Attention Guidance's batch; run the edit with a "
                        "pipeline without PAG (e.g. StableDiffusionPipeline(**pipe.components))")
    if len(layout.prompts) != n_branches or layout.images_per_prompt != 1:
        raise EditError(f"an edit runs {n_branches} prompts, one image each; the pipeline made a batch of "
                        f"{len(layout.prompts)} prompt(s) × {layout.images_per_prompt} image(s)")
    out = []
    for half in halves:
        rows = [i for i, r in enumerate(layout.rows) if r.half == half]
        if rows:
            out.append((rows[0], rows[1:]))
    return out


def text_part(call: Call, p: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The image queries' probabilities over the prompt's ``n_slots`` tokenizer slots: ``p`` itself on a
    cross-attention layer, a view ``(b, heads, n_img, n_slots)`` of a joint layer's probabilities."""
    if call.n_img_queries is None:
        return p
    n = call.n_img_queries
    return p[:, :, :n, n : n + n_slots]


def _window_size_ok(info_size: tuple[int, int], max_side: int) -> bool:
    return max(info_size) <= max_side


class CrossEdit(Controller):
    """Replace / refine / reweight on the cross-attention probabilities of the edited rows."""

    edits = True

    def __init__(self, alignments: list[Alignment], windows: list[tuple[Window, dict[int, Window]]],
                 weights: list[torch.Tensor | None]) -> None:
        self.alignments = alignments
        self.windows = windows  # per target: (default window, {slot: window})
        self.weights = weights  # per target: (slots,) factors, or None
        self.rows: list[tuple[int, list[int]]] = []
        self.alpha: list[torch.Tensor] = []  # per target: (slots,) 1 where the base's map is copied this step
        self._alpha_on: list[bool] = []
        self._alpha_device = torch.device("cpu")
        self._on: dict = {}  # device -> (matrices, weights) there

    def layers(self, run: Run) -> list[str]:
        self.rows = branch_rows(run.layout, 1 + len(self.alignments), ("cond",))
        return [i.name for i in run.layers if i.role in ("cross", "joint")]

    def begin_step(self, run: Run) -> None:
        n = run.expected_steps or 1
        self.alpha = []
        for a, (default, per_slot) in zip(self.alignments, self.windows):
            on_default = in_window(default, run.step, n)
            alpha = torch.tensor([in_window(per_slot[s], run.step, n) if s in per_slot else on_default
                                  for s in range(a.matrix.shape[1])], dtype=torch.float32)
            self.alpha.append(alpha * a.aligned)
        self._alpha_on = [bool(a.any()) for a in self.alpha]
        self._alpha_device = torch.device("cpu")
        self.active = any(self._alpha_on) or any(w is not None for w in self.weights)

    def _tensors(self, device) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if device not in self._on:
            self._on[device] = ([a.matrix.to(device) for a in self.alignments],
                                [None if w is None else w.to(device) for w in self.weights])
        return self._on[device]

    def probs(self, call: Call, p: torch.Tensor):
        """``p (b, heads, n, slots)``: the edited rows' maps replaced in place (a fresh tensor per call)."""
        joint = call.n_img_queries is not None
        n_slots = self.alignments[0].matrix.shape[0]
        if not joint and p.shape[-1] != n_slots:
            return None  # not a text-keyed call (cannot happen on a UNet's cross layers)
        t = text_part(call, p, n_slots)  # a view: writing into it writes into p
        matrices, weights = self._tensors(p.device)
        if self._alpha_device != p.device:  # once per step and device, not per layer call
            self.alpha = [a.to(p.device) for a in self.alpha]
            self._alpha_on = [bool(a.any()) for a in self.alpha]
            self._alpha_device = p.device
        for base, edited in self.rows:
            for k, row in enumerate(edited):
                alpha = self.alpha[k]
                new = t[row]
                if self._alpha_on[k]:
                    copied = t[base] @ matrices[k]
                    if joint:  # the base's distribution over the words, at this row's share of text attention
                        copied = copied * (new.sum(-1, keepdim=True) / copied.sum(-1, keepdim=True).clamp_min(1e-12))
                    new = copied * alpha + new * (1 - alpha)
                if weights[k] is not None:
                    new = new * weights[k]
                t[row] = new
        return p


class SelfInject(Controller):
    """The base row's self-attention probabilities copied into the edited rows, on layers whose map
    side is at most ``max_side``, for the steps of ``steps``."""

    edits = True

    def __init__(self, n_targets: int, steps: Window, max_side: int, halves: tuple[str, ...] = ("cond",)) -> None:
        self.n_targets, self.steps, self.max_side, self.halves = n_targets, steps, max_side, halves
        self.rows: list[tuple[int, list[int]]] = []

    def layers(self, run: Run) -> list[str]:
        self.rows = branch_rows(run.layout, 1 + self.n_targets, self.halves)
        return [i.name for i in run.layers if i.role == "self" and _window_size_ok(i.map_size(run.latent_size), self.max_side)]

    def begin_step(self, run: Run) -> None:
        self.active = in_window(self.steps, run.step, run.expected_steps or 1)

    def probs(self, call: Call, p: torch.Tensor):
        for base, edited in self.rows:
            p[edited] = p[base].clone()
        return p


class MutualSelfAttention(SelfInject):
    """The edited rows' queries attend to the base row's keys and values (MasaCtrl), same layers and steps."""

    edits = True
    probs = Controller.probs  # no probabilities are formed: the layer keeps SDPA

    def qkv(self, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None):
        k, v = k.clone(), v.clone()
        for base, edited in self.rows:
            k[edited] = k[base].clone()
            v[edited] = v[base].clone()
        return q, k, v


__all__ = ["CrossEdit", "MutualSelfAttention", "SelfInject", "branch_rows"]

"""What a trace captures: kinds, layers, steps, heads, CFG half, storage, memory budget.

The spec is checked when ``sdlens.trace`` is entered (names, patterns, types) and resolved against
the actual run at the denoiser's first call (map sizes, step count, batch), where the memory the
capture will take is estimated and compared with the budget *before* any attention is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError, CaptureError
from ..hooks.layers import LayerInfo
from ..select import LayerSelector, StepSelector, by_size, check_steps, select_layers

CFG_CHOICES = ("cond", "uncond", "both", "perturbed", "all")
"""Which rows a trace keeps: the conditional ones, the unconditional ones, both (uncond first), PAG's
perturbed branch, or every row of the batch in batch order."""
CFG_HALVES = {"cond": ("cond",), "uncond": ("uncond",), "both": ("uncond", "cond"), "perturbed": ("perturbed",),
              "all": ("uncond", "cond", "perturbed")}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class CaptureSpec:
    """The arguments of ``sdlens.trace``, validated."""

    cross: bool = True
    self_attn: bool = False
    text_attn: bool = False  # joint (SD 3) layers: the text tokens' queries, text→image and text→text
    concepts: Sequence[str] | None = None  # joint (SD 3) layers: ConceptAttention maps of these words
    layers: LayerSelector = None
    self_layers: LayerSelector = None
    steps: StepSelector = None
    heads: str | Sequence[int] = "mean"
    cfg: str = "cond"
    dtype: torch.dtype = torch.float16
    device: str | torch.device = "cpu"
    max_bytes: int | None = None
    record_latents: bool = False
    kinds: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not (self.cross or self.self_attn or self.text_attn or self.concepts or self.record_latents):
            raise CaptureError("nothing to capture: set cross=True, self_attn=True, text_attn=True, concepts=[...] "
                               "and/or record_latents=True")
        from .concepts import check_concepts

        self.concepts = check_concepts(self.concepts)
        self.kinds = tuple(k for k, on in (("cross", self.cross), ("self", self.self_attn),
                                           ("text_image", self.text_attn), ("text_text", self.text_attn),
                                           ("concept", self.concepts is not None),
                                           ("concept_image", self.concepts is not None)) if on)
        if self.self_layers is not None and not self.self_attn:
            raise CaptureError("self_layers= picks self-attention layers: it needs self_attn=True")
        if self.self_layers is not None and not self.cross and self.layers is not None:
            raise CaptureError(
                "with self_layers= given, layers= picks only cross-attention layers, but cross=False: "
                "drop layers= (or use it alone, without self_layers=)"
            )
        if self.cfg not in CFG_CHOICES:
            raise CaptureError(f"cfg={self.cfg!r} is not valid; choose one of {CFG_CHOICES}")
        if isinstance(self.heads, str):
            if self.heads not in ("mean", "all"):
                raise CaptureError(f"heads={self.heads!r} is not valid; use 'mean', 'all' or a list of head indices")
        else:
            heads = list(self.heads)
            if not heads or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads):
                raise CaptureError(f"heads must be 'mean', 'all' or a non-empty list of head indices; got {self.heads!r}")
            self.heads = heads
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise CaptureError(f"dtype must be a floating torch dtype (torch.float16, torch.float32, ...); got {self.dtype!r}")
        if self.max_bytes is not None:
            if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, (int, float)):
                raise CaptureError(f"max_bytes must be a positive number of bytes or None; got {self.max_bytes!r}")
            if self.max_bytes <= 0:
                raise BudgetError(f"max_bytes={self.max_bytes!r} leaves no room for any map: give a positive number of bytes, or None")
        self.device = torch.device(self.device)
        check_steps(self.steps)  # type check now; range is checked when the run's length is known

    def heads_kept(self, n_heads: int) -> int:
        """How many heads a layer with ``n_heads`` heads stores (1 when averaged)."""
        if self.heads == "mean":
            return 1
        if self.heads == "all":
            return n_heads
        bad = [h for h in self.heads if h >= n_heads]
        if bad:
            raise CaptureError(f"heads {bad} do not exist: layers have heads 0..{n_heads - 1}")
        return len(self.heads)

    def selectors(self) -> dict[str, LayerSelector]:
        """The layer selector of each captured kind.

        Without ``self_layers`` one selector (``layers``) picks layers of both kinds; with it,
        ``layers`` picks the cross-attention layers and ``self_layers`` the self-attention ones.
        """
        if self.self_layers is None:
            return {kind: self.layers for kind in self.kinds}
        return {kind: (self.self_layers if kind == "self" else self.layers) for kind in self.kinds}

    def candidate_layers(self, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
        """Layers that can give one of the requested kinds, filtered by name selectors (not sizes)."""
        if not self.kinds:  # only the denoising itself (record_latents) is recorded
            return []
        able = [info for info in layers if set(info.kinds()) & set(self.kinds)]
        if not able:
            raise CaptureError(f"this model has no layer with {' or '.join(self.kinds)}-attention")
        keep: set[str] = set()
        for sel, kinds, what in self._groups():
            pool = [info.name for info in able if set(info.kinds()) & kinds]
            if not pool:
                raise CaptureError(f"this model has no layer with {' or '.join(sorted(kinds))}-attention")
            if by_size(sel):
                keep.update(pool)  # by size: resolved at the first call, when map sizes are known
            else:
                keep.update(select_layers(sel, pool, what=what))
        return [info for info in able if info.name in keep]

    def _groups(self) -> list[tuple[LayerSelector, set[str], str]]:
        """(selector, the kinds it picks layers for, its argument's name): one group, or two when
        ``self_layers`` is given."""
        if self.self_layers is None:
            return [(self.layers, set(self.kinds), "layers")]
        groups = [(self.self_layers, {"self"}, "self_layers")]
        others = set(self.kinds) - {"self"}
        if others:
            groups.insert(0, (self.layers, others, "layers"))
        return groups

    def resolve(
        self, candidates: Sequence[LayerInfo], sizes: dict[str, tuple[int, int]]
    ) -> dict[str, tuple[str, ...]]:
        """The kinds kept at each chosen layer, in model order, once map sizes are known."""
        kinds_at: dict[str, set[str]] = {}
        for sel, kinds, what in self._groups():
            pool = [info for info in candidates if set(info.kinds()) & kinds]
            names = [info.name for info in pool]
            if by_size(sel):
                names = select_layers(sel, [n for n in names if n in sizes], sizes, what=what)
            else:
                names = select_layers(sel, names, what=what)
            for info in pool:
                if info.name in names:
                    kinds_at.setdefault(info.name, set()).update(set(info.kinds()) & kinds)
        return {info.name: tuple(k for k in self.kinds if k in kinds_at[info.name])
                for info in candidates if kinds_at.get(info.name)}


@dataclass(frozen=True)
class Estimate:
    """The capture's size, computed from the spec and the run before the first step."""

    total: int
    per_layer: dict[str, int]
    steps: int

    def message(self, max_bytes: int, spec: CaptureSpec) -> str:
        top = sorted(self.per_layer.items(), key=lambda kv: -kv[1])[:3]
        tips = [
            "capture fewer layers (layers='up_blocks.*' or a map size such as layers=16)",
            "capture fewer steps (steps=[0, 10, 20])",
        ]
        if spec.heads != "mean":
            tips.append("average the heads (heads='mean')")
        if spec.self_attn:
            tips.append("capture self-attention only at small maps (self_layers=8 or 16; layers= then picks the cross-attention layers)")
        if spec.cfg in ("both", "all"):
            tips.append("keep one CFG half (cfg='cond')")
        if spec.dtype.itemsize > 2:
            tips.append("store in float16")
        return (
            f"the capture would take about {_fmt_bytes(self.total)} ({self.total} bytes) for {self.steps} steps, "
            f"over max_bytes={_fmt_bytes(max_bytes)}. Largest: "
            + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in top)
            + ". To reduce it: "
            + "; ".join(tips)
            + "."
        )

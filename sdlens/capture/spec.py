"""What a trace captures: kinds, layers, steps, heads, CFG half, storage, memory budget.

The spec is checked when ``sdlens.trace`` is entered (names, patterns, types) and resolved against
the actual run at the denoiser's first call (map sizes, step count, batch), where the memory the
capture will take is estimated and compared with the budget *before* any attention is computed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .layers import LayerInfo

LayerSelector = None | str | int | Sequence[str | int] | Callable[[str], bool]
CFG_CHOICES = ("cond", "uncond", "both")


class CaptureError(ValueError):
    """A capture spec or a trace query that cannot be satisfied; the message lists valid choices."""


class BudgetError(CaptureError):
    """The capture would take more memory than ``max_bytes`` allows."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def select_layers(
    selector: LayerSelector,
    names: Sequence[str],
    sizes: dict[str, tuple[int, int]] | None = None,
    *,
    what: str = "layers",
) -> list[str]:
    """Names in ``names`` (order kept) chosen by ``selector``.

    ``selector`` is ``None`` (all), a name or glob pattern (``"up_blocks.*attn2"``), an ``int`` map
    side (``16`` picks layers whose map is 16 pixels high or wide; needs ``sizes``), a list of those,
    or a predicate on the name. Anything that matches nothing raises, listing what exists.
    """
    if selector is None:
        return list(names)
    if callable(selector) and not isinstance(selector, str):
        chosen = [n for n in names if selector(n)]
        if not chosen:
            raise CaptureError(f"the {what} predicate matched no layer; layers are: {list(names)}")
        return chosen
    items = [selector] if isinstance(selector, (str, int)) else list(selector)
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise CaptureError(
                f"{what} must be None, a name or glob pattern, an int map size, a list of these, or a "
                f"predicate; got {item!r}"
            )
        if isinstance(item, int):
            if sizes is None:
                raise CaptureError(f"{what}: map sizes are not known yet, cannot select by size {item}")
            hits = [n for n in names if item in sizes[n]]
            if not hits:
                avail = sorted({s for n in names for s in sizes[n]}, reverse=True)
                raise CaptureError(f"{what}: no layer has map size {item}; sizes are {avail}")
        else:
            hits = [n for n in names if n == item or fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise CaptureError(f"{what}: {item!r} matches no layer; layers are: {list(names)}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def select_steps(selector: None | int | Sequence[int], n_steps: int, *, what: str = "steps") -> list[int]:
    """Step indices (sampling order, from 0) chosen by ``selector``; negative indices count from the end."""
    if selector is None:
        return list(range(n_steps))
    items = [selector] if isinstance(selector, int) else list(selector)
    out = []
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int):
            raise CaptureError(f"{what} must be ints (step indices from 0); got {s!r}")
        t = s + n_steps if s < 0 else s
        if not 0 <= t < n_steps:
            raise CaptureError(f"step {s} is out of range: this run has steps 0..{n_steps - 1}")
        out.append(t)
    return sorted(set(out))


@dataclass
class CaptureSpec:
    """The arguments of ``sdlens.trace``, validated."""

    cross: bool = True
    self_attn: bool = False
    layers: LayerSelector = None
    self_layers: LayerSelector = None
    steps: None | int | Sequence[int] = None
    heads: str | Sequence[int] = "mean"
    cfg: str = "cond"
    dtype: torch.dtype = torch.float16
    device: str | torch.device = "cpu"
    max_bytes: int | None = None
    record_latents: bool = False
    kinds: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not (self.cross or self.self_attn or self.record_latents):
            raise CaptureError("nothing to capture: set cross=True, self_attn=True and/or record_latents=True")
        self.kinds = tuple(k for k, on in (("cross", self.cross), ("self", self.self_attn)) if on)
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
        if self.max_bytes is not None and (not isinstance(self.max_bytes, (int, float)) or self.max_bytes <= 0):
            raise CaptureError(f"max_bytes must be a positive number of bytes or None; got {self.max_bytes!r}")
        self.device = torch.device(self.device)
        if self.steps is not None:
            select_steps(self.steps, 10**9)  # type check now; range is checked when the run's length is known

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
        if self.cross:
            groups.insert(0, (self.layers, {"cross"}, "layers"))
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


def by_size(sel: LayerSelector) -> bool:
    """Whether a selector names map sizes (an int, or a list holding one)."""
    if isinstance(sel, bool):
        return False
    if isinstance(sel, int):
        return True
    return isinstance(sel, (list, tuple)) and any(isinstance(s, int) and not isinstance(s, bool) for s in sel)


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
        if spec.cfg == "both":
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

"""Local blend: edit only where the chosen words are, keep the base latent everywhere else.

While the edit runs, ``BlendMask`` observes the cross-attention of the blend words in every
branch's conditional row (the maps the layer uses: after a replace or refine has copied the base's
into the edited rows, as in Prompt-to-Prompt), at the layers
of one map size, and sums them over the steps so far. After each scheduler step the mask of a
branch is that sum (max-pooled over (2·pool+1)² cells when ``pool`` is set, to close small gaps),
resized to the latent, scaled to 0..1 (min to max) and thresholded (the region at or above ``threshold``); an
edited latent keeps the base latent outside
the union of its own mask and the base's:

    x_edit ← x_base + mask · (x_edit − x_base)

This is Prompt-to-Prompt's local blend. Blending may start at a fraction of the steps (``start``;
Prompt-to-Prompt waits for 0.2). The defaults (threshold 0.6, no pooling, from the first step) are
the settings that kept structure best in ``benchmarks/editing.py`` on the built-in model, whose
objects are small: a pooled or early-waiting mask leaves room for the object to move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EditError
from ..hooks.attention import attention_probs
from ..hooks.processor import Call, Controller
from ..hooks.run import Run
from ..maps import normalize
from ..select import word_occurrences
from ..tokens import Tokenization
from .controllers import branch_rows
from .steps import in_window, window


@dataclass(frozen=True)
class Blend:
    """What a local blend uses: ``words`` (looked up in every prompt that has them), the ``threshold``
    on the min-max normalised map (0..1; 0 keeps the whole edit), the map ``size`` (a side the model's cross-attention layers
    have; None: every cross-attention layer), and the fraction of the steps where it ``start``s."""

    words: tuple[str, ...]
    threshold: float = 0.6
    size: int | None = None
    start: float = 0.0
    pool: int = 0  # max-pooling radius in map cells (1: 3×3); 0 keeps the mask tight

    @staticmethod
    def of(value) -> Blend | None:
        """``None``, a word, a list of words, a dict of ``Blend``'s fields, or a ``Blend``."""
        if value is None or isinstance(value, Blend):
            return value
        if isinstance(value, str):
            return Blend((value,))
        if isinstance(value, dict):
            fields = dict(value)
            words = fields.pop("words", None)
            if words is None:
                raise EditError(f"blend={value!r}: a dict needs 'words' (and may give threshold, size, start)")
            unknown = set(fields) - {"threshold", "size", "start", "pool"}
            if unknown:
                raise EditError(f"blend: unknown setting(s) {sorted(unknown)}; valid: words, threshold, size, start, pool")
            return Blend((words,) if isinstance(words, str) else tuple(words), **fields)
        if isinstance(value, (list, tuple)) and value and all(isinstance(w, str) for w in value):
            return Blend(tuple(value))
        raise EditError(f"blend must be a word, a list of words, a dict or a sdlens.edit.Blend; got {value!r}")

    def check(self, prompts: list[Tokenization], sizes: list[int]) -> list[list[int]]:
        """The slots of the blend words in each prompt (a word may be missing from some, not from all)."""
        if not self.words:
            raise EditError("blend needs at least one word")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise EditError(f"blend threshold must lie in [0, 1]; got {self.threshold!r}")
        window(self.start, "blend start")
        if self.size is not None and self.size not in sizes:
            raise EditError(f"blend size {self.size!r} is not a map size of this model's cross-attention layers; "
                            f"valid: {sorted(set(sizes))} or None (every layer)")
        slots: list[list[int]] = [[] for _ in prompts]
        for word in self.words:
            found = False
            for k, t in enumerate(prompts):
                for i in word_occurrences(t, word):  # every occurrence, or the one a label names
                    slots[k] += t.word_tokens[i]
                    found = True
            if not found:
                raise EditError(f"blend word {word!r} is in none of the prompts; their words: "
                                + "; ".join(f"{t.words}" for t in prompts))
        return slots


@dataclass
class BlendMask(Controller):
    """Sums the blend words' cross-attention per branch, and blends the latents after each step."""

    blend: Blend
    slots: list[list[int]]  # per branch (base first): the blend words' slots in its prompt
    rows: list[int] = field(default_factory=list)  # per branch: its conditional row
    grid: tuple[int, int] | None = None  # the accumulated maps' (h, w): the largest size hooked
    total: torch.Tensor | None = None  # (branches, h, w)
    masks: torch.Tensor | None = None  # the last masks applied, (branches - 1, 1, H, W) at the latent's size
    n_steps: int = 1

    def layers(self, run: Run) -> list[str]:
        pairs = branch_rows(run.layout, len(self.slots), ("cond",))
        base, edited = pairs[-1]
        self.rows = [base, *edited]
        self.n_steps = run.expected_steps or 1
        chosen = [i for i in run.layers if i.role in ("cross", "joint")
                  and (self.blend.size is None or max(i.map_size(run.latent_size)) == self.blend.size)]
        sizes = [i.map_size(run.latent_size) for i in chosen]
        self.grid = max(sizes, key=lambda s: s[0] * s[1])
        return [i.name for i in chosen]

    def qkv(self, call: Call, q: torch.Tensor, k: torch.Tensor, v):
        if call.explicit:  # an editor forms the probabilities here: read them, edited, at ``probs``
            return
        rows = self.rows if call.rows is None else [call.rows.index(r) for r in self.rows]
        n = call.n_img_queries
        q = q[rows] if n is None else q[rows][:, :, :n]  # a joint layer: the image's queries
        p = attention_probs(q, k[rows], call.scale, reduce=lambda x: x.mean(1, keepdim=True))
        self._add(call, p if n is None else p[..., n:])

    def probs(self, call: Call, p: torch.Tensor):
        n = call.n_img_queries
        self._add(call, (p if n is None else p[:, :, :n, n:])[self.rows].mean(1, keepdim=True))

    def _add(self, call: Call, p: torch.Tensor) -> None:
        """Add this call's maps ``p (branches, 1, n, slots)`` of the blend words to the running sums."""
        h, w = self._size(call, p.shape[2])
        maps = torch.stack([p[b, 0][:, s].sum(-1) if s else torch.zeros(p.shape[2], device=p.device)
                            for b, s in enumerate(self.slots)]).reshape(len(self.rows), 1, h, w)
        if (h, w) != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        maps = maps[:, 0].float().cpu()
        self.total = maps if self.total is None else self.total + maps

    def _size(self, call: Call, n: int) -> tuple[int, int]:
        gh, gw = self.grid
        for div in (1, 2, 4, 8, 16, 32):  # this layer's grid, from the largest by whole halvings
            h, w = -(-gh // div), -(-gw // div)
            if h * w == n:
                return h, w
        raise EditError(f"layer {call.layer.name!r}: {n} queries fit no grid of the blend's map size {self.grid}")

    def apply(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents ``(branches, C, H, W)`` after step ``step``, blended (unchanged before ``start``)."""
        if self.total is None or not in_window((self.blend.start, 1.0), step, self.n_steps):
            return latents
        r = self.blend.pool
        m = F.max_pool2d(self.total[:, None], 2 * r + 1, stride=1, padding=r) if r else self.total[:, None]
        m = F.interpolate(m, size=latents.shape[-2:], mode="bilinear", align_corners=False)
        m = torch.stack([normalize(x) for x in m])  # per branch: a word read a little everywhere still has a region
        m = (m >= self.blend.threshold).float()
        self.masks = torch.maximum(m[:1], m[1:])  # each edit: its own region or the base's
        mask = self.masks.to(latents.device, latents.dtype)
        base = latents[:1]
        return torch.cat([base, base + mask * (latents[1:] - base)])


__all__ = ["Blend", "BlendMask"]

"""``AttentionTrace``: the attention maps of one pipeline run, with what they belong to.

A trace is a read-only view of two things: the maps, one tensor per captured kind and layer,

    (steps, rows, heads, queries, keys)

where *steps* are the captured denoising steps, *rows* the kept rows of the denoiser's batch (one
per prompt × image, per CFG half kept), *heads* is 1 when heads were averaged; and a ``TraceInfo``
saying what they belong to. The kinds (``KINDS``):

- ``"cross"``: queries the image's h·w pixels, keys the prompt's token slots;
- ``"self"``: queries and keys the image's pixels;
- ``"text_image"``, ``"text_text"`` (joint attention, SD 3): queries the text slots, keys the
  image's pixels or the text slots;
- ``"concept"`` (SD 3, ``concepts=``): queries the pixels, keys the concepts; the similarity of each
  pixel's attention output with each concept token's (ConceptAttention), heads 1;
- ``"concept_image"`` (the same traces): the same layout; each concept token's attention probability
  on each pixel (its query's row over the image keys), heads averaged.

``maps()`` returns a layer's tensor with the pixel queries as ``h, w``.

A trace's words, steps, layers and heads are resolved by ``word_index``, ``step_positions``,
``layer_names`` and ``head_positions``, which call ``sdlens.select`` (where the edits, the viz and
the commands resolve theirs too); every bad choice raises ``CaptureError`` naming the valid ones.
Steps are indices in sampling order; negative ones count from the end of the steps the run made.
A batch row is named by ``prompt_index``, ``image_index`` and ``half`` (``row``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .. import maps as _maps
from ..errors import CaptureError
from ..hooks.rows import Row
from ..select import LayerSelector, StepSelector, check_choice, select_layers, select_steps, select_word
from ..tokens import Tokenization
from ..vocabulary import renamed
from . import io


@dataclass
class TraceInfo:
    """What a trace's maps belong to: prompts, rows, tokens, steps, layers, sizes, the spec, and the
    recorded denoising (``record_latents=True``)."""

    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] | None = None
    images_per_prompt: int = 1
    rows: list[Row] = field(default_factory=list)
    tokenizations: dict[str, list[Tokenization | None]] = field(default_factory=lambda: {"cond": [], "uncond": []})
    key_labels: list[str] | None = None  # labels of cross keys beyond the tokenizer's slots (SD 3's T5)
    concepts: list[str] | None = None  # the keys of "concept" maps (trace(concepts=...))
    num_steps: int = 0  # denoiser calls the run made
    all_timesteps: list[float] = field(default_factory=list)  # the timestep of each of them
    steps: list[int] = field(default_factory=list)  # captured step indices
    layers: list[str] = field(default_factory=list)  # captured layers, in call order
    kinds: tuple[str, ...] = ()
    heads: dict[str, int] = field(default_factory=dict)  # layer -> number of heads in the model
    head_indices: dict[str, list[int]] | None = None  # None: heads averaged; else the model head of each stored head
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> query grid (h, w)
    image_size: tuple[int, int] | None = None
    latent_size: tuple[int, int] | None = None
    spec: dict = field(default_factory=dict)
    # the recorded denoising; its "rows" are prompt × image (the latent is shared by both CFG halves)
    latents: torch.Tensor | None = None  # (steps, rows, c, h, w) x_t seen by each captured step
    x0: torch.Tensor | None = None  # (steps, rows, c, h, w) predicted clean latents
    noise_levels: list[float] | None = None  # share of noise in x_t at each captured step
    xt_images: np.ndarray | None = None  # uint8 (steps, rows, H, W, 3): x_t decoded
    x0_images: np.ndarray | None = None  # uint8 (steps, rows, H, W, 3): x0 decoded


KINDS = ("cross", "self", "text_image", "text_text", "concept", "concept_image")
DIRECTIONS = ("image_text", "text_image", "both")  # word_map's: pixels → word, word → pixels, where both agree
CONCEPT_SPACES = ("output", "attention")  # concept_map's: ConceptAttention's output space, the concept's own rows

_DENOISING = ("latents", "x0", "xt_images", "x0_images")  # TraceInfo fields stored as tensors, not JSON


class AttentionTrace:
    """Attention maps captured by ``sdlens.trace``, indexed by kind, step, layer, row and head.

    ``AttentionTrace(maps, info)``: ``maps`` maps ``(kind, layer)`` to ``(steps, rows, heads, h·w, keys)``
    tensors, ``info`` is a ``TraceInfo``. A trace is read-only; ``replace(...)`` gives a changed copy.
    The fields of ``TraceInfo`` (``prompts``, ``steps``, ``layers``, ``rows``, ...) are its attributes.

    Example (with any diffusers text-to-image pipeline ``pipe``)::

        with sdlens.trace(pipe) as tr:
            image = pipe("a red circle on the left").images[0]
        heat = tr.word_map("circle")          # (H, W) at the image's size
        tr.save("run.safetensors"); tr2 = sdlens.load_trace("run.safetensors")
    """

    def __init__(self, maps: Mapping[tuple[str, str], torch.Tensor], info: TraceInfo) -> None:
        object.__setattr__(self, "_maps", maps)
        object.__setattr__(self, "_info", info)

    def __setattr__(self, name, value):
        raise AttributeError(f"an AttentionTrace is read-only; use trace.replace({name}=...) for a changed copy")

    def __getattr__(self, name: str):
        info = self.__dict__.get("_info")
        if info is not None and name in _INFO_FIELDS:
            return getattr(info, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | _INFO_FIELDS)

    @property
    def info(self) -> TraceInfo:
        """What the maps belong to (a copy: the trace itself is read-only)."""
        return dataclasses.replace(self._info)

    def replace(self, maps: Mapping[tuple[str, str], torch.Tensor] | None = None, **info) -> AttentionTrace:
        """A new trace with some maps (same keys) and/or ``TraceInfo`` fields replaced.

        ``maps``: ``{(kind, layer): tensor}`` replacing those keys; other keys are kept.
        """
        bad = [k for k in info if k not in _INFO_FIELDS]
        if bad:
            raise CaptureError(f"replace(): {bad} are not trace fields; fields are {sorted(_INFO_FIELDS)}")
        new_maps = {k: self._maps[k] for k in self._maps}
        for key, t in (maps or {}).items():
            if key not in new_maps:
                raise CaptureError(f"replace(): no maps {key!r} to replace; this trace has {self.keys()}")
            old = new_maps[key].shape
            same_heads = t.shape[2] == old[2] or "head_indices" in info  # other heads must be named
            if t.ndim != 5 or t.shape[:2] != old[:2] or t.shape[3:] != old[3:] or not same_heads:
                raise CaptureError(
                    f"replace(): maps {key!r} of shape {tuple(t.shape)} do not fit the stored {tuple(old)} "
                    "(steps, rows, heads, h·w, keys; other heads need head_indices=)"
                )
            new_maps[key] = t
        return AttentionTrace(new_maps, dataclasses.replace(self._info, **info))

    def _tensor(self, kind: str, layer: str) -> torch.Tensor:
        if (kind, layer) not in self._maps:
            raise CaptureError(
                f"no {kind}-attention for layer {layer!r}; captured: " + ", ".join(f"{k}:{n}" for k, n in self.keys())
            )
        return self._maps[(kind, layer)]

    # ------------------------------------------------------------------ structure
    def keys(self) -> list[tuple[str, str]]:
        """``(kind, layer)`` pairs that hold maps, layers in call order (cross before self)."""
        order = {name: i for i, name in enumerate(self.layers)}
        return sorted((k for k in self._maps if k[0] in self.kinds), key=lambda k: (order.get(k[1], len(order)), k[0]))

    def layers_of(self, kind: str = "cross") -> list[str]:
        """Captured layers that hold ``kind`` maps, in call order."""
        self._check_kind(kind)
        have = {n for k, n in self.keys() if k == kind}
        return [n for n in self.layers if n in have]

    def map_size(self, layer: str) -> tuple[int, int]:
        """Query grid ``(h, w)`` of ``layer`` in this run."""
        if layer not in self._info.sizes:
            raise CaptureError(f"unknown layer {layer!r}; captured layers are: {self.layers}")
        return tuple(self._info.sizes[layer])

    @property
    def timesteps(self) -> list[float]:
        """The scheduler's timestep of each captured step."""
        return [float(self.all_timesteps[s]) for s in self.steps]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored maps (and recorded latents and previews)."""
        n = sum(t.numel() * t.element_size() for t in self._maps.values())
        for name in _DENOISING:
            extra = getattr(self._info, name)
            if extra is not None:
                n += extra.nbytes if isinstance(extra, np.ndarray) else extra.numel() * extra.element_size()
        return n

    # ------------------------------------------------------------------ words and tokens
    @renamed(prompt="prompt_index")
    def tokenization(self, prompt_index: int = 0, *, half: str = "cond", encoder: int = 1) -> Tokenization:
        """The ``Tokenization`` of prompt ``prompt_index`` (of the negative prompt with ``half='uncond'``).

        ``encoder=2``: as SDXL's second text encoder read it (``prompt_2``; by default the same text),
        into the same slots as the first.
        """
        if half not in ("cond", "uncond"):
            raise CaptureError(f"half={half!r} is not valid; use 'cond' or 'uncond'")
        if encoder not in (1, 2):
            raise CaptureError(f"encoder={encoder!r} is not valid; use 1 or 2 (SDXL's second text encoder)")
        if encoder == 2:
            toks = self.tokenizations.get(f"{half}_2")
            if not toks:
                raise CaptureError("this trace has no second text encoder's tokens (only SDXL-style pipelines, "
                                   "with tokenizer_2, have them); use encoder=1")
            return self._pick_prompt(toks, prompt_index)
        toks = self.tokenizations.get(half)
        if not toks:
            if half == "uncond" and self.tokenizations.get("cond"):
                raise CaptureError("this trace has no negative prompts (the run used no classifier-free guidance)")
            raise CaptureError(
                "this trace does not know its prompts: the traced pipeline's encode_prompt did not run with a "
                "prompt (it got prompt_embeds, or the denoiser was called directly or by another pipeline "
                "sharing it). Pass the prompts with sdlens.trace(..., prompt=[...]), or use token_map(slot)"
            )
        return self._pick_prompt(toks, prompt_index)

    @staticmethod
    def _pick_prompt(toks: list[Tokenization | None], prompt_index: int) -> Tokenization:
        if isinstance(prompt_index, bool) or not isinstance(prompt_index, int) or not 0 <= prompt_index < len(toks):
            raise CaptureError(f"prompt_index={prompt_index!r} is out of range: this trace has prompts "
                               f"0..{len(toks) - 1}")
        tok = toks[prompt_index]
        if tok is None:
            raise CaptureError(f"prompt {prompt_index} has no known tokens (it was given as embeddings)")
        return tok

    @renamed(prompt="prompt_index")
    def tokens(self, prompt_index: int = 0, *, half: str = "cond", encoder: int = 1) -> list[str]:
        """Display strings of the key slots of prompt ``prompt_index`` (``'<start>'``, words' BPE pieces,
        ``'<end>'``, ``'<pad>'``)."""
        labels = list(self.tokenization(prompt_index, half=half, encoder=encoder).tokens)
        if self.key_labels:
            labels += self.key_labels
        return labels

    @renamed(prompt="prompt_index")
    def words(self, prompt_index: int = 0, *, half: str = "cond", encoder: int = 1) -> list[str]:
        """The whitespace-separated words of prompt ``prompt_index`` as the tokenizer sees them."""
        return list(self.tokenization(prompt_index, half=half, encoder=encoder).words)

    @renamed(prompt="prompt_index")
    def word_index(self, word: str | int, prompt_index: int = 0, *, occurrence: int | None = None,
                   half: str = "cond", encoder: int = 1) -> int:
        """Index into ``words(prompt_index)`` of ``word``: a word, its label (``"red (2)"`` for the second
        "red", see ``Tokenization.word_labels``) or an index; a word the prompt holds twice needs a label,
        an index or ``occurrence=``. ``encoder=2``: a word of SDXL's second prompt (``prompt_2``).
        Resolved by ``sdlens.select.select_word``."""
        tok = self.tokenization(prompt_index, half=half, encoder=encoder)
        missing = ""
        if encoder == 1 and isinstance(word, str) and self.tokenizations.get(f"{half}_2"):
            if self.tokenization(prompt_index, half=half, encoder=2).word_indices(word):
                missing = "; it is a word of the second prompt (prompt_2): pass encoder=2"
        return select_word(tok, word, occurrence=occurrence, missing=missing)

    # ------------------------------------------------------------------ selections
    @renamed(prompt="prompt_index", image="image_index")
    def row(self, prompt_index: int = 0, image_index: int = 0, half: str = "cond") -> int:
        """Index into the rows dimension (a batch row) of prompt ``prompt_index``'s picture ``image_index``
        in CFG half ``half``."""
        for i, r in enumerate(self.rows):
            if (r.prompt, r.image, r.half) == (prompt_index, image_index, half):
                return i
        raise CaptureError(
            f"no row for prompt_index={prompt_index}, image_index={image_index}, half={half!r}; this trace keeps "
            "rows " + ", ".join(f"(prompt_index={r.prompt}, image_index={r.image}, half={r.half!r})" for r in self.rows)
        )

    def step_positions(self, steps: StepSelector) -> list[int]:
        """Positions in the stored steps dimension of step indices ``steps`` (None: all captured steps).

        Negative indices count from the end of the steps the run made (``-1``: its last step).
        """
        if steps is None:
            return list(range(len(self.steps)))
        wanted = select_steps(steps, self.num_steps)
        missing = [s for s in wanted if s not in self.steps]
        if missing:
            raise CaptureError(f"steps {missing} were not captured; captured steps are {self.steps}")
        return [self.steps.index(s) for s in wanted]

    def layer_names(self, layers: LayerSelector = None, kind: str = "cross") -> list[str]:
        """Captured ``kind`` layers chosen by a ``layers=`` selector (names, globs, map sizes, a predicate)."""
        return select_layers(layers, self.layers_of(kind), self._info.sizes)

    def head_positions(self, heads: int | Sequence[int] | None, layer: str) -> list[int] | None:
        """Positions in the stored heads dimension of model heads ``heads`` of ``layer`` (None: all stored)."""
        if heads is None:
            return None
        items = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
        if self.head_indices is None:
            raise CaptureError("heads were averaged during capture (heads='mean'); trace with heads='all' to pick heads")
        kept = self.head_indices[layer]
        bad = [h for h in items if h not in kept]
        if bad:
            raise CaptureError(f"heads {bad} were not kept in {layer!r}; kept heads are {kept}")
        return [kept.index(h) for h in items]

    def _pick(self, kind: str, layer: str, row: int, step_idx: list[int], heads, narrow=None) -> torch.Tensor:
        """One layer's stored maps for one batch row at the chosen steps and heads: ``(steps, heads, ...)``.

        ``narrow`` (queries or keys) runs on the row's ``(steps, heads, ...)`` view before the steps
        are indexed, so only what is asked for is copied.
        """
        t = self._tensor(kind, layer)[:, row]  # (steps, heads, ...): a view
        if narrow is not None:
            t = narrow(t)
        t = t[step_idx]
        hsel = self.head_positions(heads, layer)
        return t if hsel is None else t[:, hsel]

    def _out_size(self, size) -> tuple[int, int]:
        if size is None:
            if self.image_size is None:
                raise CaptureError("the image size is unknown; pass size=(H, W)")
            return tuple(self.image_size)
        if isinstance(size, int):
            return (size, size)
        h, w = size
        return (int(h), int(w))

    # ------------------------------------------------------------------ raw maps
    def maps(self, layer: str, kind: str = "cross") -> torch.Tensor:
        """All stored maps of one layer: ``(steps, rows, heads, h, w, keys)``; for ``"text_image"``
        ``(steps, rows, heads, text slots, h, w)`` and for ``"text_text"`` ``(steps, rows, heads, T, T)``."""
        self._check_kind(kind)
        t = self._tensor(kind, layer)
        if kind == "text_text":
            return t
        h, w = self.map_size(layer)
        if kind == "text_image":
            return rearrange(t, "s r hd t (h w) -> s r hd t h w", h=h, w=w)
        return rearrange(t, "s r hd (h w) k -> s r hd h w k", h=h, w=w)

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        """``trace["cross", layer]`` is ``trace.maps(layer, "cross")``."""
        kind, layer = key
        return self.maps(layer, kind)

    # ------------------------------------------------------------------ aggregated maps
    @renamed(prompt="prompt_index", image="image_index")
    def slot_map(
        self,
        slots: Sequence[int],
        *,
        kind: str = "cross",
        prompt_index: int = 0,
        image_index: int = 0,
        half: str = "cond",
        steps: StepSelector = None,
        layers: LayerSelector = None,
        heads=None,
        size=None,
    ) -> torch.Tensor:
        """Mean over key ``slots`` of the maps, averaged over steps, heads and layers: ``(H, W)`` float32.

        Each layer's map is averaged over the chosen steps and heads at its own resolution, then
        upsampled (bilinear) to ``size`` (default: the image's), then layers are averaged.
        """
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        names = self.layer_names(layers, kind)
        out = self._out_size(size)
        per_layer = []
        for name in names:
            t = self._tensor(kind, name)  # (steps, rows, heads, n, k)
            n_keys = t.shape[-1]
            bad = [s for s in slots if not -n_keys <= s < n_keys]
            if bad:
                raise CaptureError(f"slot(s) {bad} out of range: {kind} keys are 0..{n_keys - 1}")
            x = self._pick(kind, name, r, sidx, heads, narrow=lambda t: t[..., list(slots)])  # (steps, heads, n, slots)
            x = x.float().mean(dim=(0, 1, 3))  # (n,)
            h, w = self.map_size(name)
            per_layer.append(rearrange(x, "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, out)

    @renamed(index="slot", prompt="prompt_index", image="image_index")
    def token_map(self, slot: int, **kw) -> torch.Tensor:
        """Cross-attention map of token slot ``slot`` (0 is the start slot): ``(H, W)``.

        Keyword arguments as ``slot_map``: ``prompt_index, image_index, half, steps, layers, heads, size``.
        """
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise CaptureError(f"a slot is an int (0..{len(self.tokens()) - 1}); got {slot!r}")
        return self.slot_map([slot], kind="cross", **kw)

    @renamed(prompt="prompt_index", image="image_index")
    def word_map(self, word: str | int, *, prompt_index: int = 0, occurrence: int | None = None, half: str = "cond",
                 encoder: int = 1, direction: str = "image_text", **kw):
        """Map of a prompt word (mean of its BPE tokens' maps): ``(H, W)``.

        ``word`` as ``word_index`` takes it (``encoder=2``: a word of SDXL's ``prompt_2``). Other
        keywords as ``slot_map``. ``direction`` (joint attention reads both ways):

        - ``"image_text"``: how much each pixel attends to the word (cross-attention; a UNet's
          only kind, and what the edits change);
        - ``"text_image"`` (SD 3, ``trace(pipe, text_attn=True)``): where the word's tokens attend
          in the image, as ``text_map``;
        - ``"both"`` (the same trace): where the two agree, the geometric mean of the two maps,
          each min-max normalised to [0, 1] at the output size; values in [0, 1], not probabilities.
        """
        check_choice(direction, DIRECTIONS, what="direction")
        if direction != "image_text" and encoder != 1:
            raise CaptureError(f"direction={direction!r} reads the text tokens' queries of SD 3's prompt; "
                               f"encoder={encoder} has none (use direction='image_text')")
        if direction == "text_image":
            return self.text_map(word, prompt_index=prompt_index, occurrence=occurrence, half=half, **kw)
        if direction == "both":
            pixels = self.word_map(word, prompt_index=prompt_index, occurrence=occurrence, half=half, **kw)
            words = self.text_map(word, prompt_index=prompt_index, occurrence=occurrence, half=half, **kw)
            return _maps.agreement(pixels, words)
        wi = self.word_index(word, prompt_index, occurrence=occurrence, half=half, encoder=encoder)
        slots = self.tokenization(prompt_index, half=half, encoder=encoder).word_tokens[wi]
        return self.slot_map(slots, kind="cross", prompt_index=prompt_index, half=half, **kw)

    @renamed(prompt="prompt_index", image="image_index")
    def concept_map(self, concept: str | int, *, prompt_index: int = 0, image_index: int = 0, half: str = "cond",
                    steps: StepSelector = None, layers: LayerSelector = None, softmax: bool = True,
                    space: str = "output", size=None) -> torch.Tensor:
        """Map of one concept (``trace(pipe, concepts=[...])``): ``(H, W)`` float32.

        ``space="output"`` (ConceptAttention's): per layer and step, a softmax over the concepts of
        each pixel's scores, the dot products of its attention output with each concept's
        (``softmax=False``: the raw dot products), then the mean over the chosen steps. With the
        softmax the concepts' maps sum to 1 at every pixel, so a concept list should cover the
        picture (add "background"). ``space="attention"``: where the concept token itself looks, its
        query's attention probability on each pixel (kind ``"concept_image"``), the mean over steps.
        Each layer upsampled, then layers averaged.
        """
        check_choice(space, CONCEPT_SPACES, what="space")
        concepts = self.concepts or []
        if not concepts:
            raise CaptureError("this trace has no concept maps: trace with concepts=['circle', 'square', ...]")
        if isinstance(concept, str):
            if concept not in concepts:
                raise CaptureError(f"concept {concept!r} was not traced; traced concepts: {concepts}")
            c = concepts.index(concept)
        elif isinstance(concept, int) and not isinstance(concept, bool) and -len(concepts) <= concept < len(concepts):
            c = concept % len(concepts)
        else:
            raise CaptureError(f"concept must be one of {concepts} or an index 0..{len(concepts) - 1}; got {concept!r}")
        kind = "concept" if space == "output" else "concept_image"
        if kind not in self.kinds:  # a trace saved before the concept tokens' rows were kept
            raise CaptureError(f"this trace has concepts but no {kind} maps (captured: {list(self.kinds)}): "
                               f"trace again with concepts=[...] to read space={space!r}")
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        names = self.layer_names(layers, kind)
        per_layer = []
        for name in names:
            x = self._tensor(kind, name)[:, r, 0][sidx].float()  # (steps, n, C)
            x = x.softmax(dim=-1) if softmax and space == "output" else x
            h, w = self.map_size(name)
            per_layer.append(rearrange(x[..., c].mean(dim=0), "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, self._out_size(size))

    @renamed(prompt="prompt_index", image="image_index")
    def text_map(self, word: str | int, *, prompt_index: int = 0, occurrence: int | None = None, image_index: int = 0,
                 half: str = "cond", steps: StepSelector = None, layers: LayerSelector = None, heads=None,
                 size=None) -> torch.Tensor:
        """Where a prompt word's text token looks in the image, by joint attention (text → image):
        ``(H, W)`` (``trace(pipe, text_attn=True)``, SD 3). Mean over the word's tokens, steps and
        heads; layers upsampled and averaged. Each text query's row also covers the text keys, so
        this map sums to the share of the word's attention that goes to the image, not to 1.
        """
        wi = self.word_index(word, prompt_index, occurrence=occurrence, half=half)
        slots = self.tokenization(prompt_index, half=half).word_tokens[wi]
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        per_layer = []
        for name in self.layer_names(layers, "text_image"):
            x = self._pick("text_image", name, r, sidx, heads, narrow=lambda t: t[:, :, list(slots)])  # (steps, heads, slots, h·w)
            h, w = self.map_size(name)
            per_layer.append(rearrange(x.float().mean(dim=(0, 1, 2)), "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, self._out_size(size))

    @renamed(prompt="prompt_index", image="image_index")
    def text_matrix(self, *, prompt_index: int = 0, image_index: int = 0, half: str = "cond", steps: StepSelector = None,
                    layers: LayerSelector = None, heads=None) -> torch.Tensor:
        """Text → text attention ``(text slots, text slots)`` (queries, keys), mean over steps, heads
        and layers (``trace(pipe, text_attn=True)``, SD 3)."""
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        mats = []
        for name in self.layer_names(layers, "text_text"):
            t = self._pick("text_text", name, r, sidx, heads)  # (steps, heads, T, T)
            mats.append(t.float().mean(dim=(0, 1)))
        return torch.stack(mats).mean(dim=0)

    @renamed(prompt="prompt_index", image="image_index")
    def self_map(
        self,
        pixel: tuple[float, float],
        *,
        prompt_index: int = 0,
        image_index: int = 0,
        half: str = "cond",
        steps: StepSelector = None,
        layers: LayerSelector = None,
        heads=None,
        size=None,
    ) -> torch.Tensor:
        """Where the pixel ``(y, x)`` (in image pixels) attends, by self-attention: ``(H, W)``.

        In each layer the query is the grid cell containing the pixel; its row of self-attention
        (over the layer's own grid) is averaged over steps/heads, upsampled and averaged over layers.
        """
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        names = self.layer_names(layers, "self")
        out = self._out_size(size)
        img_h, img_w = self.image_size or out
        y, x = pixel
        if not (0 <= y < img_h and 0 <= x < img_w):
            raise CaptureError(f"pixel {pixel} is outside the image of size {(img_h, img_w)}")
        per_layer = []
        for name in names:
            h, w = self.map_size(name)
            qi = int(y * h / img_h) * w + int(x * w / img_w)
            t = self._pick("self", name, r, sidx, heads, narrow=lambda t, qi=qi: t[:, :, qi])  # (steps, heads, n): one query row
            row = t.float().mean(dim=(0, 1))
            per_layer.append(rearrange(row, "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, out)

    @renamed(prompt="prompt_index", image="image_index")
    def self_matrix(
        self, layer: str, *, prompt_index: int = 0, image_index: int = 0, half: str = "cond", steps=None, heads=None
    ) -> torch.Tensor:
        """Self-attention of one layer averaged over steps and heads: ``(n, n)`` float32, n = h·w.

        Row i is where query pixel i (row-major on the layer's ``map_size``) attends.
        """
        r = self.row(prompt_index, image_index, half)
        sidx = self.step_positions(steps)
        return self._pick("self", layer, r, sidx, heads).float().mean(dim=(0, 1))  # over (steps, heads) of (n, n)

    @renamed(prompt="prompt_index", image="image_index")
    def preview_row(self, prompt_index: int = 0, image_index: int = 0) -> int:
        """Index into the rows of ``latents``/``x0``/``xt_images``/``x0_images`` (prompt × image order)."""
        n_prompts = max(1, len(self.prompts))
        if not (0 <= prompt_index < n_prompts and 0 <= image_index < self.images_per_prompt):
            raise CaptureError(
                f"no preview for prompt_index={prompt_index}, image_index={image_index}: prompt indices "
                f"0..{n_prompts - 1}, image indices 0..{self.images_per_prompt - 1}"
            )
        return prompt_index * self.images_per_prompt + image_index

    # ------------------------------------------------------------------ misc
    def _check_kind(self, kind: str) -> None:
        check_choice(kind, KINDS, what="kind")
        if kind not in self.kinds:
            hint = {"self": "self_attn=True", "cross": "cross=True", "concept": "concepts=[...]",
                    "concept_image": "concepts=[...]"}.get(kind, "text_attn=True")
            raise CaptureError(f"this trace has no {kind}-attention (captured: {list(self.kinds)}); trace with {hint}")

    @renamed(prompt="prompt_index")
    def of_prompt(self, prompt_index: int) -> AttentionTrace:
        """The trace of prompt ``prompt_index`` alone: its rows (every image, every CFG half kept), its
        tokens and its recorded denoising, as prompt 0 of a new trace. The maps are views, not copies."""
        n_prompts = len(self.prompts)
        if isinstance(prompt_index, bool) or not isinstance(prompt_index, int) or not 0 <= prompt_index < n_prompts:
            raise CaptureError(f"prompt_index={prompt_index!r} is out of range: this trace has prompts "
                               f"0..{n_prompts - 1}")
        keep = [i for i, r in enumerate(self.rows) if r.prompt == prompt_index]
        rows = [Row(r.half, 0, r.image) for r in self.rows if r.prompt == prompt_index]
        maps = {key: t[:, keep] for key, t in self._maps.items()}
        first, n_img = prompt_index * self.images_per_prompt, self.images_per_prompt
        picked = {f: getattr(self._info, f)[:, first:first + n_img] if getattr(self._info, f) is not None else None
                  for f in _DENOISING}
        tokenizations = {half: toks[prompt_index:prompt_index + 1] if len(toks) == n_prompts else list(toks)
                         for half, toks in self._info.tokenizations.items()}
        negative = None if self.negative_prompts is None else [self.negative_prompts[prompt_index]]
        return AttentionTrace(maps, dataclasses.replace(
            self._info, prompts=[self.prompts[prompt_index]], negative_prompts=negative, rows=rows,
            tokenizations=tokenizations, **picked))

    def to(self, device: str | torch.device) -> AttentionTrace:
        """A copy of the trace with its maps on ``device``."""
        return AttentionTrace({k: t.to(device) for k, t in self._maps.items()}, dataclasses.replace(self._info))

    def __repr__(self) -> str:
        sizes = sorted(set(self._info.sizes.values()), reverse=True)
        return (
            f"AttentionTrace(prompts={self.prompts!r}, kinds={list(self.kinds)}, steps={len(self.steps)}/"
            f"{self.num_steps}, layers={len(self.layers)}, map sizes={sizes}, rows={len(self.rows)}, "
            f"nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ save
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file), atomically; returns the path."""
        if getattr(self._maps, "recording", False):
            raise CaptureError("the trace is still recording: save it after the `with sdlens.trace(...)` block")
        tensors = {f"{kind}/{layer}": t for (kind, layer), t in self._maps.items()}
        for name in _DENOISING:
            extra = getattr(self._info, name)
            if extra is not None:
                tensors[f"extra/{name}"] = torch.from_numpy(np.ascontiguousarray(extra)) if isinstance(
                    extra, np.ndarray) else extra
        return io.write(path, tensors, _metadata(self._info))


_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(TraceInfo)) - {"sizes"}


def _metadata(info: TraceInfo) -> dict:
    meta = {}
    for f in dataclasses.fields(TraceInfo):
        if f.name in _DENOISING:
            continue
        value = getattr(info, f.name)
        if f.name == "rows":
            value = [asdict(r) for r in value]
        elif f.name == "tokenizations":
            value = {h: [None if t is None else asdict(t) for t in ts] for h, ts in value.items()}
        elif f.name == "kinds":
            value = list(value)
        elif f.name == "sizes":
            value = {k: list(v) for k, v in value.items()}
        elif f.name in ("image_size", "latent_size"):
            value = list(value) if value else None
        meta[f.name] = value
    return meta


def load_trace(path: str | os.PathLike, device: str | torch.device = "cpu") -> AttentionTrace:
    """Read a trace written by ``AttentionTrace.save`` (safetensors + JSON; never unpickles)."""
    tensors, meta = io.read(path, device)
    try:
        info = TraceInfo(
            prompts=meta["prompts"],
            negative_prompts=meta["negative_prompts"],
            images_per_prompt=meta["images_per_prompt"],
            rows=[Row(**r) for r in meta["rows"]],
            tokenizations={h: [None if t is None else Tokenization(**t) for t in ts]
                           for h, ts in meta["tokenizations"].items()},
            key_labels=meta["key_labels"],
            concepts=meta.get("concepts"),
            num_steps=meta["num_steps"],
            all_timesteps=meta["all_timesteps"],
            steps=meta["steps"],
            layers=meta["layers"],
            kinds=tuple(meta["kinds"]),
            heads=meta["heads"],
            head_indices=meta["head_indices"],
            sizes={k: tuple(v) for k, v in meta["sizes"].items()},
            image_size=tuple(meta["image_size"]) if meta["image_size"] else None,
            latent_size=tuple(meta["latent_size"]) if meta["latent_size"] else None,
            spec=meta["spec"],
            noise_levels=meta.get("noise_levels"),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise CaptureError(f"{str(path)!r}: its trace metadata is incomplete or malformed ({type(e).__name__}: {e})") from None
    maps = {}
    for key, t in tensors.items():
        group, name = key.split("/", 1)
        if group == "extra":
            setattr(info, name, t.numpy() if name.endswith("_images") else t)
        else:
            maps[(group, name)] = t
    return AttentionTrace(maps, info)


__all__ = ["AttentionTrace", "TraceInfo", "load_trace"]

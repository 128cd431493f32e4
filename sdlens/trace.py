"""``AttentionTrace``: the attention maps of one pipeline run, with what they belong to.

Storage, per captured kind (``"cross"`` or ``"self"``) and layer, is one tensor

    (steps, rows, heads, queries = h·w, keys)

where *steps* are the captured denoising steps, *rows* the kept rows of the denoiser's batch (one
per prompt × image, per CFG half kept), *heads* is 1 when heads were averaged, and *keys* are
prompt token slots (cross) or pixels (self). ``maps()`` returns it with the queries as ``h, w``.

A trace is saved as one safetensors file whose header holds the JSON metadata; loading never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from . import maps as _maps
from .capture.spec import CaptureError, LayerSelector, select_layers, select_steps
from .tokens import Tokenization

FORMAT = "sdlens.trace"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One kept row of the denoiser's batch: which CFG half, prompt and image it is."""

    half: str  # "cond" or "uncond"
    prompt: int
    image: int


class AttentionTrace:
    """Attention maps captured by ``sdlens.trace``, indexed by kind, step, layer, row and head.

    Example (with any diffusers text-to-image pipeline ``pipe``)::

        with sdlens.trace(pipe) as tr:
            image = pipe("a red circle on the left").images[0]
        heat = tr.word_map("circle")          # (H, W) at the image's size
        tr.save("run.safetensors"); tr2 = sdlens.load_trace("run.safetensors")
    """

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.negative_prompts: list[str] | None = None
        self.images_per_prompt: int = 1
        self.rows: list[Row] = []
        self.tokenizations: dict[str, list[Tokenization | None]] = {"cond": [], "uncond": []}
        self.key_labels: list[str] | None = None  # labels of cross keys beyond the tokenizer's slots
        self.num_steps: int = 0  # denoiser calls seen
        self.all_timesteps: list[float] = []
        self.steps: list[int] = []  # captured step indices
        self.layers: list[str] = []  # captured layers, in call order
        self.kinds: tuple[str, ...] = ()
        self.heads: dict[str, int] = {}  # layer -> number of heads in the model
        # None: heads averaged; else, per layer, the model head index of each stored head
        self.head_indices: dict[str, list[int]] | None = None
        self._sizes: dict[str, tuple[int, int]] = {}
        self.image_size: tuple[int, int] | None = None
        self.latent_size: tuple[int, int] | None = None
        self.spec: dict = {}
        self._filling: dict[tuple[str, str], _Filling] = {}  # while recording
        self._data: dict[tuple[str, str], torch.Tensor] = {}
        # Recorded with record_latents=True; their "rows" are prompt × image (the latent is shared by both CFG halves).
        self.latents: torch.Tensor | None = None  # (steps, rows, c, h, w) x_t seen by each step
        self.x0: torch.Tensor | None = None  # (steps, rows, c, h, w) predicted clean latents, if recorded
        self.noise_levels: list[float] | None = None  # share of noise in x_t at each captured step
        self.xt_images: np.ndarray | None = None  # uint8 (steps, rows, H, W, 3): x_t decoded
        self.x0_images: np.ndarray | None = None  # uint8 (steps, rows, H, W, 3): x0 decoded

    # ------------------------------------------------------------------ filling (used by the recorder)
    def _append(self, kind: str, layer: str, probs: torch.Tensor, slot: int, *, capacity: int | None,
                device: str | torch.device, dtype: torch.dtype) -> None:
        """Write one step's ``probs`` ``(rows, heads, n, keys)`` at captured-step position ``slot``.

        ``capacity``: the number of steps this run will keep, when known (storage is allocated once);
        ``device``, ``dtype``: where and how the maps are stored.
        """
        key = (kind, layer)
        if key not in self._filling:
            self._filling[key] = _Filling(probs, capacity, device, dtype)
            if layer not in self.layers:
                self.layers.append(layer)
        self._filling[key].write(slot, probs, layer)

    def _finalize(self, device: str | torch.device = "cpu") -> None:
        _Filling.wait_all(self._filling.values())  # asynchronous GPU -> host copies have landed
        self.all_timesteps = [float(t) for t in self.all_timesteps]  # GPU timesteps are read once, here
        for key, filling in self._filling.items():
            self._data[key] = filling.result().to(device)
        self._filling = {}

    def _allocated_bytes(self) -> int:
        """Bytes the maps' storage holds now, written or not (while recording: grown storage counts)."""
        return sum(f.allocated for f in self._filling.values()) + sum(
            t.numel() * t.element_size() for t in self._data.values())

    def _tensor(self, kind: str, layer: str) -> torch.Tensor:
        if self._filling:  # still recording: the steps written so far
            filling = self._filling.get((kind, layer))
            if filling is not None:
                return filling.filled()
        if (kind, layer) not in self._data:
            raise CaptureError(
                f"no {kind}-attention for layer {layer!r}; captured: "
                + ", ".join(f"{k}:{n}" for k, n in self.keys())
            )
        return self._data[(kind, layer)]

    # ------------------------------------------------------------------ structure
    def keys(self) -> list[tuple[str, str]]:
        """``(kind, layer)`` pairs that hold maps, layers in call order (cross before self)."""
        src = self._filling if self._filling else self._data
        order = {name: i for i, name in enumerate(self.layers)}
        return sorted((k for k in src if k[0] in self.kinds), key=lambda k: (order.get(k[1], len(order)), k[0]))

    def layers_of(self, kind: str = "cross") -> list[str]:
        """Captured layers that hold ``kind`` maps, in call order."""
        self._check_kind(kind)
        have = {n for k, n in self.keys() if k == kind}
        return [n for n in self.layers if n in have]

    def map_size(self, layer: str) -> tuple[int, int]:
        """Query grid ``(h, w)`` of ``layer`` in this run."""
        if layer not in self._sizes:
            raise CaptureError(f"unknown layer {layer!r}; captured layers are: {self.layers}")
        return self._sizes[layer]

    @property
    def timesteps(self) -> list[float]:
        """The scheduler's timestep of each captured step."""
        return [self.all_timesteps[s] for s in self.steps]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored maps (and recorded latents)."""
        n = sum(t.numel() * t.element_size() for t in self._data.values())
        n += sum(f.nbytes for f in self._filling.values())
        for extra in (self.latents, self.x0):
            if extra is not None:
                n += extra.numel() * extra.element_size()
        for images in (self.xt_images, self.x0_images):
            if images is not None:
                n += images.nbytes
        return n

    def tokens(self, prompt: int = 0, *, half: str = "cond") -> list[str]:
        """Display strings of the key slots of ``prompt`` (``'<start>'``, words' BPE pieces, ``'<end>'``, ``'<pad>'``)."""
        tok = self.tokenization(prompt, half=half)
        labels = list(tok.tokens)
        if self.key_labels:
            labels += self.key_labels
        return labels

    def words(self, prompt: int = 0, *, half: str = "cond") -> list[str]:
        """The whitespace-separated words of ``prompt`` as the tokenizer sees them."""
        return list(self.tokenization(prompt, half=half).words)

    def tokenization(self, prompt: int = 0, *, half: str = "cond") -> Tokenization:
        """The ``Tokenization`` of prompt ``prompt`` (of the negative prompt with ``half='uncond'``)."""
        toks = self.tokenizations.get(half)
        if half not in ("cond", "uncond"):
            raise CaptureError(f"half={half!r} is not valid; use 'cond' or 'uncond'")
        if not toks:
            raise CaptureError(
                "this trace does not know its prompts' tokens (the pipeline was called with prompt_embeds, "
                "or the denoiser was traced directly); use token_map(index) with a slot index"
            )
        if not isinstance(prompt, int) or not 0 <= prompt < len(toks):
            raise CaptureError(f"prompt={prompt!r} is out of range: this trace has prompts 0..{len(toks) - 1}")
        tok = toks[prompt]
        if tok is None:
            raise CaptureError(f"prompt {prompt} has no known tokens (it was given as embeddings)")
        return tok

    # ------------------------------------------------------------------ raw maps
    def maps(self, layer: str, kind: str = "cross") -> torch.Tensor:
        """All stored maps of one layer: ``(steps, rows, heads, h, w, keys)``."""
        self._check_kind(kind)
        t = self._tensor(kind, layer)
        h, w = self.map_size(layer)
        return rearrange(t, "s r hd (h w) k -> s r hd h w k", h=h, w=w)

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        """``trace["cross", layer]`` is ``trace.maps(layer, "cross")``."""
        kind, layer = key
        return self.maps(layer, kind)

    def row(self, prompt: int = 0, image: int = 0, half: str = "cond") -> int:
        """Index into the rows dimension of the row for this prompt, image and CFG half."""
        for i, r in enumerate(self.rows):
            if (r.prompt, r.image, r.half) == (prompt, image, half):
                return i
        raise CaptureError(
            f"no row for prompt={prompt}, image={image}, half={half!r}; this trace keeps rows "
            + ", ".join(f"(prompt={r.prompt}, image={r.image}, half={r.half!r})" for r in self.rows)
        )

    # ------------------------------------------------------------------ aggregated maps
    def _pick_layers(self, layers: LayerSelector, kind: str) -> list[str]:
        names = self.layers_of(kind)
        return select_layers(layers, names, self._sizes)

    def _pick_steps(self, steps) -> list[int]:
        """Positions in the stored steps dimension for step indices ``steps`` (None: all)."""
        if steps is None:
            return list(range(len(self.steps)))
        wanted = select_steps(steps, self.num_steps)
        missing = [s for s in wanted if s not in self.steps]
        if missing:
            raise CaptureError(f"steps {missing} were not captured; captured steps are {self.steps}")
        return [self.steps.index(s) for s in wanted]

    def _pick_heads(self, heads, layer: str) -> list[int] | None:
        if heads is None:
            return None
        items = [heads] if isinstance(heads, int) else list(heads)
        if self.head_indices is None:
            raise CaptureError("heads were averaged during capture (heads='mean'); trace with heads='all' to pick heads")
        kept = self.head_indices[layer]
        bad = [h for h in items if h not in kept]
        if bad:
            raise CaptureError(f"heads {bad} were not kept in {layer!r}; kept heads are {kept}")
        return [kept.index(h) for h in items]

    def _out_size(self, size) -> tuple[int, int]:
        if size is None:
            if self.image_size is None:
                raise CaptureError("the image size is unknown; pass size=(H, W)")
            return self.image_size
        if isinstance(size, int):
            return (size, size)
        h, w = size
        return (int(h), int(w))

    def slot_map(
        self,
        slots: Sequence[int],
        *,
        kind: str = "cross",
        prompt: int = 0,
        image: int = 0,
        half: str = "cond",
        steps=None,
        layers: LayerSelector = None,
        heads=None,
        size=None,
    ) -> torch.Tensor:
        """Mean over key ``slots`` of the maps, averaged over steps, heads and layers: ``(H, W)`` float32.

        Each layer's map is averaged over the chosen steps and heads at its own resolution, then
        upsampled (bilinear) to ``size`` (default: the image's), then layers are averaged.
        """
        r = self.row(prompt, image, half)
        sidx = self._pick_steps(steps)
        names = self._pick_layers(layers, kind)
        out = self._out_size(size)
        per_layer = []
        for name in names:
            t = self._tensor(kind, name)  # (steps, rows, heads, n, k)
            n_keys = t.shape[-1]
            bad = [s for s in slots if not -n_keys <= s < n_keys]
            if bad:
                raise CaptureError(f"slot(s) {bad} out of range: {kind} keys are 0..{n_keys - 1}")
            hsel = self._pick_heads(heads, name)
            x = t[:, r][..., list(slots)][sidx]  # (steps, heads, n, slots): pick before copying
            if hsel is not None:
                x = x[:, hsel]
            x = x.float().mean(dim=(0, 1, 3))  # (n,)
            h, w = self.map_size(name)
            per_layer.append(rearrange(x, "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, out)

    def token_map(self, index: int, **kw) -> torch.Tensor:
        """Cross-attention map of token slot ``index`` (0 is the start slot): ``(H, W)``.

        Keyword arguments as ``slot_map``: ``prompt, image, half, steps, layers, heads, size``.
        """
        if isinstance(index, bool) or not isinstance(index, int):
            raise CaptureError(f"token index must be an int slot (0..{len(self.tokens()) - 1}); got {index!r}")
        return self.slot_map([index], kind="cross", **kw)

    def word_map(self, word: str | int, *, prompt: int = 0, occurrence: int | None = None, half: str = "cond", **kw):
        """Cross-attention map of a prompt word (mean of its BPE tokens' maps): ``(H, W)``.

        ``word`` is a word of the prompt (``trace.words(prompt)``), its label (``"red (2)"`` for the
        second "red", see ``Tokenization.word_labels``) or its index in that list; a word that
        occurs twice needs a label, an index or ``occurrence=``. Other keywords as ``slot_map``.
        """
        tok = self.tokenization(prompt, half=half)
        if isinstance(word, bool):
            raise CaptureError(f"word must be a str or a word index; got {word!r}")
        if isinstance(word, int):
            if not 0 <= word < len(tok.words):
                raise CaptureError(f"word index {word} is out of range: prompt {prompt} has words {tok.words}")
            wi = word
        else:
            try:
                wi = tok.word_index(word, occurrence)
            except ValueError as e:
                n = len(tok.word_indices(word))
                hint = f", or pass occurrence=0..{n - 1}" if n > 1 and occurrence is None else ""
                raise CaptureError(f"{e}{hint}") from None
        return self.slot_map(tok.word_tokens[wi], kind="cross", prompt=prompt, half=half, **kw)

    def self_map(
        self,
        pixel: tuple[float, float],
        *,
        prompt: int = 0,
        image: int = 0,
        half: str = "cond",
        steps=None,
        layers: LayerSelector = None,
        heads=None,
        size=None,
    ) -> torch.Tensor:
        """Where the pixel ``(y, x)`` (in image pixels) attends, by self-attention: ``(H, W)``.

        In each layer the query is the grid cell containing the pixel; its row of self-attention
        (over the layer's own grid) is averaged over steps/heads, upsampled and averaged over layers.
        """
        r = self.row(prompt, image, half)
        sidx = self._pick_steps(steps)
        names = self._pick_layers(layers, "self")
        out = self._out_size(size)
        img_h, img_w = self.image_size or out
        y, x = pixel
        if not (0 <= y < img_h and 0 <= x < img_w):
            raise CaptureError(f"pixel {pixel} is outside the image of size {(img_h, img_w)}")
        per_layer = []
        for name in names:
            h, w = self.map_size(name)
            qi = int(y * h / img_h) * w + int(x * w / img_w)
            t = self._tensor("self", name)[:, r, :, qi][sidx]  # (steps, heads, n): one query row
            hsel = self._pick_heads(heads, name)
            if hsel is not None:
                t = t[:, hsel]
            row = t.float().mean(dim=(0, 1))
            per_layer.append(rearrange(row, "(h w) -> h w", h=h, w=w))
        return _maps.average_upsampled(per_layer, out)

    def self_matrix(
        self, layer: str, *, prompt: int = 0, image: int = 0, half: str = "cond", steps=None, heads=None
    ) -> torch.Tensor:
        """Self-attention of one layer averaged over steps and heads: ``(n, n)`` float32, n = h·w.

        Row i is where query pixel i (row-major on the layer's ``map_size``) attends.
        """
        r = self.row(prompt, image, half)
        sidx = self._pick_steps(steps)
        t = self._tensor("self", layer)[:, r][sidx]  # (steps, heads, n, n)
        hsel = self._pick_heads(heads, layer)
        if hsel is not None:
            t = t[:, hsel]
        return t.float().mean(dim=(0, 1))

    def preview_row(self, prompt: int = 0, image: int = 0) -> int:
        """Index into the rows of ``latents``/``x0``/``xt_images``/``x0_images`` (prompt × image order)."""
        n_prompts = max(1, len(self.prompts))
        if not (0 <= prompt < n_prompts and 0 <= image < self.images_per_prompt):
            raise CaptureError(
                f"no preview for prompt={prompt}, image={image}: prompts 0..{n_prompts - 1}, "
                f"images 0..{self.images_per_prompt - 1}"
            )
        return prompt * self.images_per_prompt + image

    # ------------------------------------------------------------------ misc
    def _check_kind(self, kind: str) -> None:
        if kind not in ("cross", "self"):
            raise CaptureError(f"kind={kind!r} is not valid; use 'cross' or 'self'")
        if kind not in self.kinds:
            hint = "self_attn=True" if kind == "self" else "cross=True"
            raise CaptureError(f"this trace has no {kind}-attention (captured: {list(self.kinds)}); trace with {hint}")

    def to(self, device: str | torch.device) -> AttentionTrace:
        """Move the stored maps to ``device`` (in place); returns self."""
        self._data = {k: v.to(device) for k, v in self._data.items()}
        return self

    def __repr__(self) -> str:
        sizes = sorted({s for s in self._sizes.values()}, reverse=True)
        return (
            f"AttentionTrace(prompts={self.prompts!r}, kinds={list(self.kinds)}, steps={len(self.steps)}/"
            f"{self.num_steps}, layers={len(self.layers)}, map sizes={sizes}, rows={len(self.rows)}, "
            f"nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ save / load
    def _metadata(self) -> dict:
        def tok_dict(t):
            return None if t is None else asdict(t)

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "prompts": self.prompts,
            "negative_prompts": self.negative_prompts,
            "images_per_prompt": self.images_per_prompt,
            "rows": [asdict(r) for r in self.rows],
            "tokenizations": {h: [tok_dict(t) for t in ts] for h, ts in self.tokenizations.items()},
            "key_labels": self.key_labels,
            "num_steps": self.num_steps,
            "all_timesteps": self.all_timesteps,
            "steps": self.steps,
            "layers": self.layers,
            "kinds": list(self.kinds),
            "heads": self.heads,
            "head_indices": self.head_indices,
            "sizes": {k: list(v) for k, v in self._sizes.items()},
            "image_size": list(self.image_size) if self.image_size else None,
            "latent_size": list(self.latent_size) if self.latent_size else None,
            "spec": self.spec,
            "noise_levels": self.noise_levels,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file), atomically; returns the path."""
        from safetensors.torch import save_file

        if self._filling:
            raise CaptureError("the trace is still recording: save it after the `with sdlens.trace(...)` block")
        path = Path(path)
        tensors = {f"{kind}/{layer}": t.contiguous() for (kind, layer), t in self._data.items()}
        if self.latents is not None:
            tensors["extra/latents"] = self.latents.contiguous()
        if self.x0 is not None:
            tensors["extra/x0"] = self.x0.contiguous()
        for name in ("xt_images", "x0_images"):
            if getattr(self, name) is not None:
                tensors[f"extra/{name}"] = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sdlens-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a trace is an ordinary file
        try:
            save_file(tensors, tmp, metadata={"sdlens": json.dumps(self._metadata())})
            os.replace(tmp, path)  # never leave a half-written trace behind
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def load_trace(path: str | os.PathLike, device: str | torch.device = "cpu") -> AttentionTrace:
    """Read a trace written by ``AttentionTrace.save`` (safetensors + JSON; never unpickles)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta_raw = (f.metadata() or {}).get("sdlens")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise CaptureError(f"{str(path)!r} is not a safetensors file written by sdlens: {e}") from None
    if meta_raw is None:
        raise CaptureError(f"{str(path)!r} is a safetensors file but not an sdlens trace (no 'sdlens' metadata)")
    meta = json.loads(meta_raw)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CaptureError(
            f"{str(path)!r} has format {meta.get('format')!r} version {meta.get('format_version')}; this sdlens "
            f"reads {FORMAT!r} up to version {FORMAT_VERSION}"
        )
    tr = AttentionTrace()
    tr.prompts = meta["prompts"]
    tr.negative_prompts = meta["negative_prompts"]
    tr.images_per_prompt = meta["images_per_prompt"]
    tr.rows = [Row(**r) for r in meta["rows"]]
    tr.tokenizations = {
        h: [None if t is None else Tokenization(**t) for t in ts] for h, ts in meta["tokenizations"].items()
    }
    tr.key_labels = meta["key_labels"]
    tr.num_steps = meta["num_steps"]
    tr.all_timesteps = meta["all_timesteps"]
    tr.steps = meta["steps"]
    tr.layers = meta["layers"]
    tr.kinds = tuple(meta["kinds"])
    tr.heads = meta["heads"]
    tr.head_indices = meta["head_indices"]
    tr._sizes = {k: tuple(v) for k, v in meta["sizes"].items()}
    tr.image_size = tuple(meta["image_size"]) if meta["image_size"] else None
    tr.latent_size = tuple(meta["latent_size"]) if meta["latent_size"] else None
    tr.spec = meta["spec"]
    tr.noise_levels = meta.get("noise_levels")
    for key, t in tensors.items():
        group, name = key.split("/", 1)
        if group == "extra":
            setattr(tr, name, t.numpy() if name.endswith("_images") else t)
        else:
            tr._data[(group, name)] = t
    return tr


class _Filling:
    """The storage of one (kind, layer) while a trace records: ``(capacity, rows, heads, n, keys)``.

    Allocated at the layer's first step for the number of steps the run will keep (the recorder
    knows it before the first step), on the storage device; each step is copied into its slot, so
    the maps are not held twice (stacking per-step pieces at the end did). With no known number
    of steps the storage doubles as it fills, and is trimmed to the steps written at the end.

    Maps made on a GPU and stored on the CPU are copied asynchronously: the storage is page-locked
    in place (``cudaHostRegister``, exact size, released at the end; PyTorch's own pinned allocator
    would round each buffer up to a power of two and keep it locked after the trace is gone), so
    GPU memory does not grow with the trace and the host does not wait for the GPU mid-run. Where
    page-locking fails, copies are ordinary (synchronous) ones.
    """

    def __init__(self, probs: torch.Tensor, capacity: int | None, device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.shape = probs.shape
        self.source = probs.device  # where the maps are made
        # a CUDA -> host copy is asynchronous only into page-locked memory
        self.pinned = probs.device.type == "cuda" and self.device.type == "cpu"
        self.cast_first = probs.device != self.device  # cast where the maps were made: half the bytes to move
        self.count = 0
        self.written: list[bool] = []
        self.buffer: torch.Tensor | None = None
        self._allocate(max(1, capacity or 8))

    def _allocate(self, steps: int) -> None:
        buffer = torch.empty((steps, *self.shape), dtype=self.dtype, device=self.device)
        if self.pinned and not _page_lock(buffer):
            self.pinned = False
        old = self.buffer
        if old is not None:
            buffer[: self.count].copy_(old[: self.count])
            self._unlock(old)
        self.buffer = buffer
        self.slots = buffer.unbind(0)  # one view per step, made once (indexing per call costs an op)
        self.written += [False] * (steps - len(self.written))

    def write(self, slot: int, probs: torch.Tensor, layer: str = "") -> None:
        if probs.shape != self.shape:
            raise CaptureError(
                f"attention of shape {tuple(probs.shape)} at step slot {slot}, but earlier steps of layer "
                f"{layer!r} had {tuple(self.shape)}: the batch or the image size changed within one traced call"
            )
        if slot >= len(self.slots):  # more steps than expected: grow (rare: unknown step count)
            self.wait()
            self._allocate(max(slot + 1, 2 * len(self.slots)))
        if self.written[slot]:
            raise CaptureError(
                f"layer {layer!r} was called twice in one denoiser call; a trace keeps one map per layer and "
                "step: leave this layer out (layers=...)"
            )
        if self.cast_first:
            probs = probs.to(self.dtype)
        self.slots[slot].copy_(probs, non_blocking=self.pinned)
        self.written[slot] = True
        self.count = max(self.count, slot + 1)

    def wait(self) -> None:
        """Wait until the asynchronous copies into this storage have landed."""
        if self.pinned:
            torch.cuda.synchronize(self.source)

    @staticmethod
    def wait_all(fillings) -> None:
        for device in {f.source for f in fillings if f.pinned}:  # one synchronize per GPU
            torch.cuda.synchronize(device)

    def filled(self) -> torch.Tensor:
        """The steps written so far, ``(count, rows, heads, n, keys)`` (a view)."""
        self.wait()
        return self.buffer[: self.count]

    def result(self) -> torch.Tensor:
        """The final tensor ``(count, ...)``, page-locking released: the storage itself, or a copy of
        its first ``count`` steps where fewer came than were allocated (an interrupted run, an unknown
        step count). Steps a layer was not called at (it skipped them) hold NaN, not stale memory."""
        self.wait()
        for slot in range(self.count):
            if not self.written[slot]:
                self.buffer[slot].fill_(float("nan"))
        out = self.buffer if self.count == self.buffer.shape[0] else self.buffer[: self.count].clone()
        self._unlock(self.buffer)
        return out

    def _unlock(self, buffer: torch.Tensor) -> None:
        if self.pinned:
            _page_unlock(buffer)

    @property
    def nbytes(self) -> int:
        """Bytes of the steps written so far."""
        return self.count * self.buffer[0].numel() * self.buffer.element_size()

    @property
    def allocated(self) -> int:
        """Bytes the storage holds, written or not."""
        return self.buffer.numel() * self.buffer.element_size()


def _page_lock(t: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's memory in place (for asynchronous GPU -> host copies); False if refused."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0
    except (RuntimeError, AttributeError):
        return False


def _page_unlock(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

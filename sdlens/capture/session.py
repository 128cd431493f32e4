"""``sdlens.trace``: install capture processors for one pipeline run, and put everything back.

What it touches, and restores in ``finally`` (normal exit, exception, KeyboardInterrupt):

- the denoiser's attention processors (``set_attn_processor`` with the original objects);
- a forward pre-hook on the denoiser that counts steps (one denoiser call = one step), and a
  forward hook that turns the step's held-back queries and keys into probabilities (``probs``);
- an instance attribute ``encode_prompt`` on the pipeline that notes the prompts, negative prompts
  and images per prompt (the class's method is untouched; the attribute is deleted afterwards).

Processors are installed at the denoiser's first call, when the batch, the latent size and the
number of steps are known: the memory estimate is checked there, before any attention is computed.
"""

from __future__ import annotations

import inspect

import torch

from ..tokens import tokenize
from ..trace import AttentionTrace, Row
from . import probs
from .denoising import DenoisingRecorder
from .layers import LayerInfo, attention_layers, denoiser_of, infer_map_size
from .probs import Pending, compute_pending, take
from .processor import CaptureProcessor
from .spec import BudgetError, CaptureError, CaptureSpec, Estimate, select_steps

_ACTIVE = "_sdlens_recorder"  # attribute set on a denoiser while it is traced


def _describe(selector):
    """A layer selector as JSON can hold it (a predicate becomes a placeholder)."""
    if isinstance(selector, (str, int, type(None))):
        return selector
    if isinstance(selector, (list, tuple)):
        return list(selector)
    return "<predicate>"


def _as_list(x) -> list | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


class Recorder:
    """Does the bookkeeping of one trace: the processors hand it queries and keys (``defer``), which it
    turns into probabilities when the denoiser's call returns (``flush``) and stores (``store``)."""

    def __init__(self, target, spec: CaptureSpec, prompt=None) -> None:
        self.spec = spec
        self.denoiser = denoiser_of(target)
        self.pipe = None if target is self.denoiser else target
        self.all_layers = attention_layers(self.denoiser)
        self.candidates = spec.candidate_layers(self.all_layers)
        self.trace = AttentionTrace()
        self.trace.kinds = spec.kinds
        self.trace.spec = {
            "cross": spec.cross,
            "self_attn": spec.self_attn,
            "layers": _describe(spec.layers),
            "self_layers": _describe(spec.self_layers),
            "steps": spec.steps if spec.steps is None or isinstance(spec.steps, int) else list(spec.steps),
            "heads": spec.heads,
            "cfg": spec.cfg,
            "dtype": str(spec.dtype).removeprefix("torch."),
        }
        self.call_info: dict | None = {"prompt": _as_list(prompt)} if prompt is not None else None
        self.step = -1
        self.keeping = False
        self.kept_steps: set[int] | None = None
        self.n_steps_expected: int | None = None
        self.installed: dict[str, LayerInfo] = {}
        self.kinds_at: dict[str, tuple[str, ...]] = {}
        self._originals: dict | None = None
        self._rows: dict[tuple, object] = {}
        self._row_ids: list[int] = []
        self._head_sel: torch.Tensor | None = None
        self._handles: list = []
        self._pending: list[Pending] = []  # this step's captured calls, computed when the denoiser returns
        self._pending_bytes = 0
        self._seen: set[str] = set()  # layers already in trace.layers
        self._patched_encode = False
        self.estimate: Estimate | None = None
        self.denoising = DenoisingRecorder(self) if spec.record_latents else None

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> AttentionTrace:
        if getattr(self.denoiser, _ACTIVE, None) is not None:
            raise CaptureError(
                "this pipeline is already being traced: nest no sdlens.trace inside another on the same model; "
                "capture both kinds with one trace (cross=True, self_attn=True)"
            )
        self._originals = dict(self.denoiser.attn_processors)
        setattr(self.denoiser, _ACTIVE, self)
        try:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._on_step, with_kwargs=True))
            self._handles.append(self.denoiser.register_forward_hook(self._on_step_end))
            if self.pipe is not None and hasattr(self.pipe, "encode_prompt") and "encode_prompt" not in vars(self.pipe):
                self.pipe.encode_prompt = self._wrap_encode(self.pipe.encode_prompt)
                self._patched_encode = True
            if self.denoising is not None:
                if getattr(self.pipe, "scheduler", None) is None:
                    raise CaptureError("record_latents=True needs a pipeline with a scheduler, not a bare denoiser")
                self.denoising.install(self.pipe.scheduler)
        except BaseException:
            self._restore()
            raise
        return self.trace

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        if exc_type is None and self.denoising is not None:
            self.denoising.finish(self.trace, self.pipe)

    def _restore(self) -> None:
        try:
            if self.installed and self._originals is not None:
                self.denoiser.set_attn_processor(dict(self._originals))  # it pops from the dict it gets
        finally:
            try:
                if self._pending:  # the denoiser raised mid-call: keep the layers that ran, as they were
                    self.flush()
            except Exception:  # noqa: BLE001 - restoring goes on; the error that stopped the run is raised
                pass
            finally:  # even a Ctrl-C during that computation leaves nothing of the trace on the model
                self._pending.clear()
                for h in self._handles:
                    h.remove()
                self._handles.clear()
                if self.denoising is not None:
                    self.denoising.uninstall()
                if self._patched_encode:
                    del self.pipe.encode_prompt
                    self._patched_encode = False
                if getattr(self.denoiser, _ACTIVE, None) is self:
                    delattr(self.denoiser, _ACTIVE)
                self.installed = {}
                self.keeping = False
                self.trace._finalize(self.spec.device)

    # ------------------------------------------------------------------ prompt bookkeeping
    def _wrap_encode(self, original):
        sig = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            if self.step >= 0:
                raise CaptureError(
                    "a trace records one pipeline call: open a new `with sdlens.trace(pipe) as tr:` for each call"
                )
            bound = sig.bind_partial(*args, **kwargs).arguments
            info = self.call_info or {}
            if info.get("prompt") is None:
                info["prompt"] = _as_list(bound.get("prompt"))
            info["negative_prompt"] = _as_list(bound.get("negative_prompt"))
            info["num_images_per_prompt"] = int(bound.get("num_images_per_prompt", 1) or 1)
            if "do_classifier_free_guidance" in bound:
                info["cfg"] = bool(bound["do_classifier_free_guidance"])
            self.call_info = info
            return original(*args, **kwargs)

        return encode_prompt

    # ------------------------------------------------------------------ steps
    def _on_step(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        self.step += 1
        if self.step == 0:
            self._setup(sample, context)
        elif self.n_steps_expected is not None and self.step >= self.n_steps_expected and self.spec.steps is None:
            self.n_steps_expected = None  # more calls than the scheduler said (e.g. a 2nd-order solver)
        if torch.is_tensor(timestep):
            t = timestep.detach().flatten()[0]
            t = t if t.device.type != "cpu" else float(t)  # no GPU sync per step: read at the end
        else:
            t = float(timestep)
        self.trace.all_timesteps.append(t)
        self.trace.num_steps = self.step + 1
        self.keeping = self.kept_steps is None or self.step in self.kept_steps
        if self.keeping:
            self.trace.steps.append(self.step)
            self._check_running_budget()

    @property
    def _heads_kept(self) -> int | None:
        """Heads stored per map: 1 (averaged), the chosen ones, or None (all of the layer's)."""
        if self.spec.heads == "mean":
            return 1
        return None if self.spec.heads == "all" else len(self.spec.heads)

    def _on_step_end(self, module, args, output) -> None:
        self.flush()

    def defer(self, item: Pending) -> None:
        """Note one captured layer call; its probabilities are computed at the end of the step."""
        name = item.processor.info.name
        if name not in self._seen:  # a set: a list scan per call would grow with the model (SDXL: 140 layers)
            self._seen.add(name)
            self.trace.layers.append(name)  # in call order, whatever order the batches are stored in
        self._pending.append(item)
        self._pending_bytes += item.q.numel() * item.q.element_size() + item.k.numel() * item.k.element_size()
        if self._pending_bytes > probs.PENDING_BYTES:  # bounded memory: compute what is held so far
            self.flush()

    def flush(self) -> None:
        """Compute and store the probabilities of the calls deferred during this step."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            with torch.no_grad():
                compute_pending(pending, self.reduce_heads, self._heads_kept)

    def _expected_steps(self) -> int | None:
        # diffusers pipelines set _num_timesteps = len(timesteps) just before their loop (img2img too)
        n = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(n, int) and n > 0:
            return n
        sched = getattr(self.pipe, "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        if ts is None or not len(ts):
            return None
        begin = getattr(sched, "begin_index", None) or 0
        return len(ts) - begin

    def _setup(self, sample: torch.Tensor, context: torch.Tensor | None) -> None:
        spec, tr = self.spec, self.trace
        batch = sample.shape[0]
        latent_hw = tuple(sample.shape[-2:])
        tr.latent_size = latent_hw
        vsf = getattr(self.pipe, "vae_scale_factor", None) if self.pipe is not None else None
        tr.image_size = (latent_hw[0] * vsf, latent_hw[1] * vsf) if vsf else latent_hw
        self._setup_rows(batch)
        self._setup_tokens(context)

        # layers: map sizes are known now, so size selectors can be resolved
        sizes = {info.name: info.map_size(latent_hw) for info in self.candidates if info.factor is not None}
        self.kinds_at = spec.resolve(self.candidates, sizes)  # layer -> the kinds kept there
        chosen = [info for info in self.candidates if info.name in self.kinds_at]
        tr._sizes.update({n: sizes[n] for n in self.kinds_at if n in sizes})
        tr.heads = {info.name: info.heads for info in chosen}

        if spec.heads == "all":
            tr.head_indices = {info.name: list(range(info.heads)) for info in chosen}
        elif spec.heads != "mean":
            for info in chosen:
                spec.heads_kept(info.heads)
            tr.head_indices = {info.name: list(spec.heads) for info in chosen}
            self._head_sel = torch.tensor(spec.heads)

        # steps
        self.n_steps_expected = self._expected_steps()
        if spec.steps is not None:
            if self.n_steps_expected is None:
                if any(s < 0 for s in ([spec.steps] if isinstance(spec.steps, int) else spec.steps)):
                    raise CaptureError("negative step indices need a known number of steps (trace a pipeline)")
                self.kept_steps = set(select_steps(spec.steps, 10**9))
            else:
                self.kept_steps = set(select_steps(spec.steps, self.n_steps_expected))

        # estimate, then the budget, before any attention is computed
        n_keys = context.shape[1] if context is not None else 0
        self.estimate = self._estimate(chosen, latent_hw, n_keys)
        if spec.max_bytes is not None and self.estimate is not None and self.estimate.total > spec.max_bytes:
            raise BudgetError(self.estimate.message(spec.max_bytes, spec))

        procs = dict(self._originals)
        for info in chosen:
            key = f"{info.name}.processor"
            procs[key] = CaptureProcessor(self, info, self._originals[key])
            self.installed[info.name] = info
        self.denoiser.set_attn_processor(procs)

    def _setup_rows(self, batch: int) -> None:
        info, tr, spec = self.call_info or {}, self.trace, self.spec
        prompts = info.get("prompt")
        n_img = info.get("num_images_per_prompt", 1)
        per_half = len(prompts) * n_img if prompts else None
        if per_half and batch == 2 * per_half:
            cfg = True
        elif per_half and batch == per_half:
            cfg = False
        else:
            cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
            per_half = batch // 2 if cfg else batch
            n_img = n_img if prompts and per_half == len(prompts) * n_img else 1
        if not cfg and spec.cfg != "cond":
            raise CaptureError(
                f"cfg={spec.cfg!r} needs a classifier-free-guidance batch, but this run has none "
                "(guidance_scale <= 1): use cfg='cond'"
            )
        halves = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}[spec.cfg]
        rows, ids = [], []
        for half in halves:
            offset = per_half if (cfg and half == "cond") else 0
            for i in range(per_half):
                rows.append(Row(half=half, prompt=i // n_img, image=i % n_img))
                ids.append(offset + i)
        tr.rows, self._row_ids = rows, ids
        tr.images_per_prompt = n_img
        tr.prompts = list(prompts) if prompts else []
        neg = info.get("negative_prompt")
        if cfg and prompts:
            if neg is None:
                neg = [""] * len(prompts)
            elif len(neg) == 1 and len(prompts) > 1:
                neg = neg * len(prompts)
            tr.negative_prompts = list(neg)

    def _setup_tokens(self, context: torch.Tensor | None) -> None:
        tr = self.trace
        tokenizer = getattr(self.pipe, "tokenizer", None) if self.pipe is not None else None
        if tokenizer is None or not tr.prompts:
            return
        tr.tokenizations["cond"] = [tokenize(p, tokenizer) for p in tr.prompts]
        if tr.negative_prompts is not None:
            tr.tokenizations["uncond"] = [tokenize(p, tokenizer) for p in tr.negative_prompts]
        n_slots = len(tr.tokenizations["cond"][0].ids)
        if context is not None and context.shape[1] > n_slots:  # SD3: CLIP slots, then T5's
            extra = context.shape[1] - n_slots
            t5 = getattr(self.pipe, "tokenizer_3", None)
            tr.key_labels = [f"<t5:{i}>" for i in range(extra)]
            if t5 is not None and len(tr.prompts) == 1:  # labels are shared by all rows: name them for one prompt only
                ids = t5(tr.prompts[0], padding="max_length", max_length=extra, truncation=True).input_ids
                tr.key_labels = [f"t5:{s}" for s in t5.convert_ids_to_tokens(ids)]

    def _estimate(self, chosen: list[LayerInfo], latent_hw, n_keys: int) -> Estimate | None:
        spec = self.spec
        n_steps = len(self.kept_steps) if self.kept_steps is not None else self.n_steps_expected
        if n_steps is None:
            return None
        item = torch.empty((), dtype=spec.dtype).element_size()
        per_layer = {}
        for info in chosen:
            if info.factor is None:
                continue
            h, w = info.map_size(latent_hw)
            n = h * w
            per_row_step = 0
            kinds = set(self.kinds_at.get(info.name, ()))
            if "cross" in kinds:
                per_row_step += n * n_keys
            if "self" in kinds:
                per_row_step += n * n
            per_layer[info.name] = n_steps * len(self._row_ids) * spec.heads_kept(info.heads) * per_row_step * item
        return Estimate(total=sum(per_layer.values()), per_layer=per_layer, steps=n_steps)

    def _check_running_budget(self) -> None:
        mb = self.spec.max_bytes
        if mb is None or self.estimate is not None:
            return
        held = self.trace._allocated_bytes()  # storage grown for steps to come counts too
        if held > mb:
            raise BudgetError(
                f"the capture passed max_bytes={mb} after {len(self.trace.steps)} steps ({held} bytes held); "
                "capture fewer layers or steps, or average heads"
            )

    # ------------------------------------------------------------------ called by processors
    def kept_rows(self, batch: int, device: torch.device | None = None):
        """The kept rows of a batch of ``batch`` rows: a slice when contiguous, else an index tensor on
        ``device`` (see ``probs.take``); cached, so that equal selections are one object and an
        index moves to the GPU once."""
        key = (batch, device)
        if key not in self._rows:
            ids = self._row_ids if max(self._row_ids, default=-1) < batch else list(range(batch))
            if ids == list(range(ids[0], ids[0] + len(ids))):
                self._rows[key] = slice(ids[0], ids[0] + len(ids))
            else:
                self._rows[key] = torch.tensor(ids, device=device)
        return self._rows[key]

    def row_picker(self, batch: int, device: torch.device | None = None):
        """A function selecting the kept rows of a batch of ``batch`` rows."""
        rows = self.kept_rows(batch, device)
        return lambda x: take(x, rows)

    def reduce_heads(self, probs: torch.Tensor) -> torch.Tensor:
        """``(rows, heads, n, keys)`` → the heads the spec keeps: ``(rows, 1, n, keys)`` for the mean."""
        if self.spec.heads == "mean":
            return probs.mean(dim=1, keepdim=True)
        if self._head_sel is not None:
            if self._head_sel.device != probs.device:  # moved once, not per call
                self._head_sel = self._head_sel.to(probs.device)
            return probs.index_select(1, self._head_sel)
        return probs

    def store(self, kind: str, info: LayerInfo, probs: torch.Tensor) -> None:
        """Keep ``probs`` ``(rows, heads kept, n, keys)`` (already reduced) of one layer at the current step."""
        tr, spec = self.trace, self.spec
        if info.name not in tr._sizes:
            tr._sizes[info.name] = infer_map_size(probs.shape[2], tr.latent_size)
        # into storage allocated once for all kept steps, on the storage device (see trace._Filling)
        tr._append(kind, info.name, probs, len(tr.steps) - 1, capacity=self.estimate.steps if self.estimate else None,
                   device=spec.device, dtype=spec.dtype)


def trace(
    pipe,
    *,
    cross: bool = True,
    self_attn: bool = False,
    layers=None,
    self_layers=None,
    steps=None,
    heads="mean",
    cfg: str = "cond",
    dtype: torch.dtype = torch.float16,
    device="cpu",
    max_bytes: int | None = None,
    record_latents: bool = False,
    prompt=None,
) -> Recorder:
    """Capture attention maps while ``pipe`` runs; ``with trace(pipe) as tr:`` gives an ``AttentionTrace``.

    Args:
        pipe: a diffusers pipeline (SD 1.x/2.x, SDXL, SD3, img2img, ...) or its denoiser.
        cross: capture cross-attention (pixel → prompt token).
        self_attn: capture self-attention (pixel → pixel); large: ``(h·w)²`` per map.
        layers: ``None`` (all), a diffusers module path or glob (``"up_blocks.*"``), an int map side
            (``16``), a list of these, or a predicate on the name.
        self_layers: the self-attention layers, chosen the same ways, when they should differ from
            the cross-attention ones (self-attention maps grow as ``(h·w)²``: ``self_layers=16``
            keeps only the small ones); ``layers`` then picks only cross-attention layers. ``None``:
            ``layers`` picks both.
        steps: ``None`` (all) or step indices in sampling order (negative from the end).
        heads: ``"mean"`` (average heads), ``"all"``, or a list of head indices to keep.
        cfg: which classifier-free-guidance half to keep: ``"cond"``, ``"uncond"`` or ``"both"``.
        dtype, device: how and where the maps are stored. Each layer's storage for all kept steps is
            allocated at its first step and filled step by step (from a GPU into a CPU store:
            asynchronous copies into page-locked memory), so the maps are not held twice when the
            pipeline says how many steps it runs (tracing a bare denoiser, storage doubles as it fills).
        max_bytes: memory budget; an over-budget capture raises ``BudgetError`` (a ``ValueError``) with
            the estimate before the denoiser's first forward.
        record_latents: also keep, per captured step, x_t, the predicted clean latent x0, the noise
            level and VAE-decoded previews of both (``tr.latents``, ``tr.x0``, ``tr.noise_levels``,
            ``tr.xt_images``, ``tr.x0_images``).
        prompt: the prompt(s), when the pipeline is called with ``prompt_embeds`` or the denoiser is
            traced directly.

    Example::

        with sdlens.trace(pipe, layers=16) as tr:
            pipe("a red circle on the left", num_inference_steps=20)
        tr.word_map("circle").shape   # the image's (H, W)
    """
    spec = CaptureSpec(
        cross=cross,
        self_attn=self_attn,
        layers=layers,
        self_layers=self_layers,
        steps=steps,
        heads=heads,
        cfg=cfg,
        dtype=dtype,
        device=device,
        max_bytes=max_bytes,
        record_latents=record_latents,
    )
    return Recorder(pipe, spec, prompt=prompt)


__all__ = ["trace", "Recorder"]

"""``attach(pipe, controllers)``: hook a pipeline's attention layers for one run, and put everything back.

What it touches, and restores in ``finally`` (normal exit, exception, KeyboardInterrupt):

- the denoiser's attention processors (``set_attn_processor`` with the original objects);
- a forward pre-hook on the denoiser that counts steps (one denoiser call = one step), and a
  forward hook that ends each step;
- an instance attribute ``encode_prompt`` on the pipeline that notes the prompts, negative prompts
  and images per prompt (the class's method is untouched; the attribute is deleted afterwards).

``HookProcessor``s are installed at the denoiser's first call, when the batch, the latent size and
the number of steps are known, on the layers the controllers ask for there; every other layer keeps
its own processor. One attachment at a time per denoiser: a second raises ``CaptureError``.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import CaptureError
from .layers import LayerInfo, attention_layers, denoiser_of
from .processor import Controller, HookProcessor
from .rows import RowLayout, row_layout

_ACTIVE = "_sdlens_hooks"  # attribute set on a denoiser while it is hooked


class Run:
    """What the controllers know of the run: the pipeline, the step, the batch's rows, the sizes.

    Filled as the run goes: ``call`` when the pipeline encodes its prompt, the rest at the
    denoiser's first call (``step`` 0).
    """

    def __init__(self, pipe, denoiser: torch.nn.Module, prompt=None) -> None:
        self.pipe = pipe  # None when a bare denoiser is hooked
        self.denoiser = denoiser
        self.layers: list[LayerInfo] = attention_layers(denoiser)
        self.call: dict | None = {"prompt": prompt} if prompt is not None else None  # encode_prompt's arguments
        self.step = -1  # the denoiser call under way (sampling order, from 0)
        self.timestep = None  # its timestep (a tensor on a GPU run: read at the end, no sync per step)
        self.layout: RowLayout | None = None
        self.latent_size: tuple[int, int] | None = None
        self.image_size: tuple[int, int] | None = None
        self.context_len = 0  # keys of the encoder states (77 for SD 1.x; more for SD 3)
        self.expected_steps: int | None = None  # the number of denoiser calls the scheduler plans
        self._rows: dict = {}

    def rows_for(self, controllers: list[Controller], batch: int) -> list[int] | None:
        """The batch rows the ``controllers`` need, sorted (None: all), for a batch of ``batch`` rows."""
        key = (tuple(map(id, controllers)), batch)
        if key not in self._rows:
            wanted: set[int] = set()
            for c in controllers:
                rows = c.rows(self)
                if rows is None or max(rows, default=-1) >= batch:  # all, or a batch unlike the layout's
                    wanted = None
                    break
                wanted.update(rows)
            self._rows[key] = None if wanted is None or len(wanted) == batch else sorted(wanted)
        return self._rows[key]

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

    def _start(self, sample: torch.Tensor, context: torch.Tensor | None) -> None:
        self.latent_size = tuple(sample.shape[-2:])
        vsf = getattr(self.pipe, "vae_scale_factor", None) if self.pipe is not None else None
        self.image_size = (self.latent_size[0] * vsf, self.latent_size[1] * vsf) if vsf else self.latent_size
        self.context_len = context.shape[1] if context is not None else 0
        self.expected_steps = self._expected_steps()
        pipe_cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        self.layout = row_layout(sample.shape[0], self.call, pipe_cfg)


class Attachment:
    """The context manager ``attach`` returns; ``with attach(pipe, [c]) as run:`` gives the ``Run``."""

    def __init__(self, target, controllers: list[Controller], prompt=None) -> None:
        if not controllers or not all(isinstance(c, Controller) for c in controllers):
            raise CaptureError(f"attach needs a list of sdlens.hooks.Controller objects; got {controllers!r}")
        self.denoiser = denoiser_of(target)
        self.pipe = None if target is self.denoiser else target
        self.controllers = list(controllers)
        self.run = Run(self.pipe, self.denoiser, prompt)
        self.installed: dict[str, HookProcessor] = {}
        self._originals: dict | None = None
        self._handles: list = []
        self._patched_encode = False

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> Run:
        if getattr(self.denoiser, _ACTIVE, None) is not None:
            raise CaptureError(
                "this pipeline is already being traced: nest no sdlens.trace inside another on the same model; "
                "capture both kinds with one trace (cross=True, self_attn=True)"
            )
        self._originals = dict(self.denoiser.attn_processors)
        setattr(self.denoiser, _ACTIVE, self)
        try:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._begin_step, with_kwargs=True))
            self._handles.append(self.denoiser.register_forward_hook(self._end_step))
            if self.pipe is not None and hasattr(self.pipe, "encode_prompt") and "encode_prompt" not in vars(self.pipe):
                self.pipe.encode_prompt = self._wrap_encode(self.pipe.encode_prompt)
                self._patched_encode = True
            for c in self.controllers:
                c.open(self.run)
        except BaseException as e:
            self._restore(e)
            raise
        return self.run

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore(exc)

    def _restore(self, error: BaseException | None) -> None:
        """Original processors first, then the controllers close (they may compute what they held
        back), then every hook comes off, even if a Ctrl-C lands in between."""
        try:
            if self.installed and self._originals is not None:
                self.denoiser.set_attn_processor(dict(self._originals))  # it pops from the dict it gets
        finally:
            try:
                _close_all(self.controllers, self.run, error)
            finally:
                for h in self._handles:
                    h.remove()
                self._handles.clear()
                if self._patched_encode:
                    del self.pipe.encode_prompt
                    self._patched_encode = False
                if getattr(self.denoiser, _ACTIVE, None) is self:
                    delattr(self.denoiser, _ACTIVE)
                self.installed = {}

    # ------------------------------------------------------------------ prompt bookkeeping
    def _wrap_encode(self, original):
        sig = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            if self.run.step >= 0:
                raise CaptureError(
                    "a trace records one pipeline call: open a new `with sdlens.trace(pipe) as tr:` for each call"
                )
            bound = sig.bind_partial(*args, **kwargs).arguments
            call = self.run.call or {}
            if call.get("prompt") is None:
                call["prompt"] = bound.get("prompt")
            call["negative_prompt"] = bound.get("negative_prompt")
            call["num_images_per_prompt"] = int(bound.get("num_images_per_prompt", 1) or 1)
            if "do_classifier_free_guidance" in bound:
                call["cfg"] = bool(bound["do_classifier_free_guidance"])
            self.run.call = call
            return original(*args, **kwargs)

        return encode_prompt

    # ------------------------------------------------------------------ steps
    def _begin_step(self, module, args, kwargs) -> None:
        run = self.run
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        run.step += 1
        if torch.is_tensor(timestep):
            t = timestep.detach().flatten()[0]
            run.timestep = t if t.device.type != "cpu" else float(t)
        else:
            run.timestep = float(timestep)
        if run.step == 0:
            run._start(sample, context)
            self._install()
        for c in self.controllers:
            c.begin_step(run)

    def _end_step(self, module, args, output) -> None:
        for c in self.controllers:
            c.end_step(self.run)

    def _install(self) -> None:
        """Ask each controller for its layers; hook their union, every other layer keeps its processor."""
        wanted: dict[str, list[Controller]] = {}
        for c in self.controllers:
            for name in c.layers(self.run):
                wanted.setdefault(name, []).append(c)
        if not wanted:
            return
        infos = {info.name: info for info in self.run.layers}
        procs = dict(self._originals)
        installed = {}
        for name, controllers in wanted.items():
            key = f"{name}.processor"
            installed[name] = procs[key] = HookProcessor(self.run, infos[name], self._originals[key], controllers)
        self.denoiser.set_attn_processor(procs)
        self.installed = installed


def _close_all(controllers: list[Controller], run: Run, error: BaseException | None) -> None:
    """``close`` every controller, each even when an earlier one raised (that error is raised at the end)."""
    if not controllers:
        return
    try:
        controllers[0].close(run, error)
    finally:
        _close_all(controllers[1:], run, error)


def attach(pipe, controllers: list[Controller], *, prompt=None) -> Attachment:
    """Hook ``pipe``'s attention layers for one pipeline call; ``with attach(pipe, [c]) as run:``.

    ``pipe`` is a diffusers pipeline or its denoiser; ``controllers`` are ``Controller`` objects
    (capture, edits), called in this order at each named point (editors before observers).
    ``prompt``: the prompt(s), when the pipeline is called with ``prompt_embeds`` or the denoiser
    is hooked directly.
    """
    return Attachment(pipe, controllers, prompt=prompt)


__all__ = ["Attachment", "Run", "attach"]

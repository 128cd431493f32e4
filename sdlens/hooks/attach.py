"""``attach(pipe, controllers)``: hook a pipeline's attention layers for one run, and put everything back.

What it touches, and restores in ``finally`` (normal exit, exception, KeyboardInterrupt):

- the processors of the hooked layers: each is wrapped at the denoiser's first call (so processors
  the pipeline sets for its run, such as PAG's, are the ones run and traced) and put back at the
  end where the hook is still in place (a pipeline that restored its own processors is left so);
  a processor the pipeline swaps in mid-run is wrapped in its turn at the next step. When the run
  ends in an exception, every processor is set back to what it was on entering (the pipeline's own
  clean-up after its loop never ran);
- a ``torch.compile``'d denoiser of a pipeline: the pipeline runs its original module (the one
  under the compiled wrapper) while hooked, and gets its compiled module back afterwards;
- a forward pre-hook on the denoiser that counts steps (one denoiser call = one step) and appends
  the tokens controllers add to the text input (concept tokens), and a forward hook that ends each
  step;
- an instance attribute ``encode_prompt`` on the pipeline that notes the prompts, negative prompts
  and images per prompt (the class's method is untouched; the attribute is deleted afterwards);
- for processors that call diffusers' attention dispatcher (Flux's), the dispatcher name in their
  module, intercepted while any attachment needs it (``hooks.dispatch``).

``HookProcessor``s are installed at the denoiser's first call, when the batch, the latent size and
the number of steps are known, on the layers the controllers ask for there; every other layer keeps
its own processor. One attachment at a time per denoiser: a second raises ``CaptureError``.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import CaptureError
from . import dispatch
from .layers import LayerInfo, compiled_denoiser, denoiser_of
from .processor import Controller, HookProcessor
from .run import Run

_ACTIVE = "_sdlens_hooks"  # attribute set on a denoiser while it is hooked


class Attachment:
    """The context manager ``attach`` returns; ``with attach(pipe, [c]) as run:`` gives the ``Run``."""

    def __init__(self, target, controllers: list[Controller], prompt=None) -> None:
        if not controllers or not all(isinstance(c, Controller) for c in controllers):
            raise CaptureError(f"attach needs a list of sdlens.hooks.Controller objects; got {controllers!r}")
        self.denoiser = denoiser_of(target)
        self.pipe = None if target is self.denoiser else target
        self.compiled = compiled_denoiser(self.pipe) if self.pipe is not None else None
        self.controllers = list(controllers)
        self.run = Run(self.pipe, self.denoiser, prompt)
        self.installed: dict[str, HookProcessor] = {}  # layer -> the hook in place there
        self._at_enter: dict = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._handles: list = []
        self._patched_encode = False
        self._dispatch: list = []  # modules whose dispatcher this attachment intercepts

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> Run:
        if getattr(self.denoiser, _ACTIVE, None) is not None:
            raise CaptureError(
                "this pipeline is already being traced: nest no sdlens.trace inside another on the same model; "
                "capture both kinds with one trace (cross=True, self_attn=True)"
            )
        setattr(self.denoiser, _ACTIVE, self)
        self._at_enter = dict(self.denoiser.attn_processors)
        try:
            if self.compiled is not None:  # the pipeline calls the original module while hooked
                setattr(self.pipe, self.compiled[0], self.denoiser)
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
        """Processors first (and the dispatcher they were hooked through), then the controllers close
        (they may compute what they held back), then every hook comes off, even if a Ctrl-C lands in
        between."""
        try:
            try:
                self._uninstall(error)
            finally:
                while self._dispatch:
                    dispatch.release(self._dispatch.pop())
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
                if self.compiled is not None and getattr(self.pipe, self.compiled[0], None) is self.denoiser:
                    setattr(self.pipe, self.compiled[0], self.compiled[1])
                if getattr(self.denoiser, _ACTIVE, None) is self:
                    delattr(self.denoiser, _ACTIVE)

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
            if self.run.encoded and "negative_prompt" not in sig.parameters:
                # a second prompt encoded on its own: the negative of "true" CFG (Flux), which such a
                # pipeline runs as a second denoiser call per step
                call["separate_negative"] = True
            if call.get("prompt") is None:
                call["prompt"] = bound.get("prompt")
            for second in ("prompt_2", "negative_prompt_2"):  # SDXL's and SD 3's second text encoder
                if bound.get(second) is not None:
                    call[second] = bound[second]
            call["negative_prompt"] = bound.get("negative_prompt")
            call["num_images_per_prompt"] = int(bound.get("num_images_per_prompt", 1) or 1)
            if "do_classifier_free_guidance" in bound:
                call["cfg"] = bool(bound["do_classifier_free_guidance"])
            self.run.call = call
            self.run.encoded = True
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
            run._start(sample, context, kwargs.get("img_ids"))
            self._install()
        else:
            self._rewrap()
        for c in self.controllers:
            c.begin_step(run)
        return self._append_context(args, kwargs, context)

    def _append_context(self, args, kwargs, context):
        """Tokens the controllers add to the text input (concepts), appended after the prompt's."""
        if context is None:
            return None
        extra = [t for c in self.controllers if (t := c.context_tokens(self.run, context)) is not None]
        if not extra:
            return None
        added = torch.cat(extra, dim=1).to(context)
        self.run.n_concepts = added.shape[1]
        context = torch.cat([context, added], dim=1)
        txt_ids = kwargs.get("txt_ids")
        if torch.is_tensor(txt_ids) and txt_ids.shape[-2] == context.shape[1] - added.shape[1]:
            # Flux: positions of the text tokens (all zero: text has no place in the image); the
            # concepts get theirs, zero too
            pad = txt_ids.new_zeros(*txt_ids.shape[:-2], added.shape[1], txt_ids.shape[-1])
            kwargs = {**kwargs, "txt_ids": torch.cat([txt_ids, pad], dim=-2)}
        if len(args) > 2:
            return (*args[:2], context, *args[3:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": context}

    def _end_step(self, module, args, output) -> None:
        for c in self.controllers:
            c.end_step(self.run)

    def _install(self) -> None:
        """Ask each controller for its layers; hook their union around the processors in place now
        (the pipeline's own for this run included); every other layer keeps its processor."""
        wanted: dict[str, list[Controller]] = {}
        for c in self.controllers:
            for name in c.layers(self.run):
                wanted.setdefault(name, []).append(c)
        if not wanted:
            return
        infos = {info.name: info for info in self.run.layers}
        modules = dict(self.denoiser.named_modules())
        current = self.denoiser.attn_processors
        procs = dict(current)
        installed = {}
        for name, controllers in wanted.items():
            key = f"{name}.processor"
            installed[name] = procs[key] = self._hook(infos[name], current[key], controllers)
            self._modules[name] = modules[name]
        self.denoiser.set_attn_processor(procs)  # it pops from the dict it gets
        self.installed = installed

    def _hook(self, info: LayerInfo, original, controllers: list[Controller]) -> HookProcessor:
        hook = HookProcessor(self.run, info, original, controllers)
        if hook.dispatch_module is not None and hook.dispatch_module not in self._dispatch:
            dispatch.acquire(hook.dispatch_module)
            self._dispatch.append(hook.dispatch_module)
        return hook

    def _rewrap(self) -> None:
        """A processor the pipeline set on a hooked layer since the last step is hooked in its turn."""
        for name, hook in self.installed.items():
            module = self._modules[name]
            if module.processor is not hook:
                if isinstance(module.processor, HookProcessor):  # another attachment's: not ours to wrap
                    continue
                new = self._hook(hook.info, module.processor, hook.controllers)
                module.set_processor(new)
                self.installed[name] = new

    def _uninstall(self, error: BaseException | None) -> None:
        """Each hooked layer gets back the processor its hook wraps, where the hook is still in place;
        after an exception, every layer gets the processor it had on entering."""
        installed, self.installed = self.installed, {}
        if error is not None and self.denoiser.attn_processors != self._at_enter:
            self.denoiser.set_attn_processor(dict(self._at_enter))  # it pops from the dict it gets
        else:
            for name, hook in installed.items():
                module = self._modules[name]
                if module.processor is hook:
                    module.set_processor(hook.original)
        self._modules = {}


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

"""Processors that call diffusers' attention dispatcher (``dispatch_attention_fn``): Flux and most
models added since diffusers 0.35.

Such a processor makes its queries, keys and values itself (projections, norms, rotary positions)
and hands them to the dispatcher, which runs the attention on a backend (PyTorch's SDPA, a flash
kernel, …). sdlens does not copy these processors: while a hooked layer's own processor runs, the
dispatcher name in that processor's module is an interceptor (``acquire``/``release``, counted, put
back when the last attachment that needed it ends) that, for the one call the hooked layer is making
(``intercepting``), gives the queries and keys to the controllers' named points and otherwise calls
the dispatcher as the processor would have. Every other call, and every call outside a hooked
layer, goes straight to the dispatcher.

The dispatcher's tensors are ``(b, n, heads, d)`` (sequence before heads). A joint layer whose
sequence is text first (Flux: ``[text, image]``; its single-stream blocks the same, as one input)
is handed to the controllers in SD 3's order, image then text, and its output put back in the
layer's order; concept tokens at the end of the text are kept out of every key the image and the
text see.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from types import ModuleType

_NAME = "dispatch_attention_fn"
_current: contextvars.ContextVar = contextvars.ContextVar("sdlens_dispatch", default=None)
_lock = threading.Lock()
_patched: dict[str, tuple[object, int]] = {}  # module name -> (the dispatcher it had, users)


def module_of(processor) -> ModuleType | None:
    """The module of ``processor``'s class when that module calls diffusers' dispatcher, else None."""
    module = sys.modules.get(type(processor).__module__)
    if module is None or not callable(getattr(module, _NAME, None)):
        return None
    return module


def acquire(module: ModuleType) -> None:
    """Put the interceptor in ``module`` (once, however many attachments need it)."""
    with _lock:
        original, users = _patched.get(module.__name__, (getattr(module, _NAME), 0))
        if users == 0:
            setattr(module, _NAME, _interceptor(original))
        _patched[module.__name__] = (original, users + 1)


def release(module: ModuleType) -> None:
    """Undo one ``acquire``; the last gives the module its dispatcher back."""
    with _lock:
        original, users = _patched.get(module.__name__, (None, 0))
        if users <= 1:
            _patched.pop(module.__name__, None)
            if original is not None:
                setattr(module, _NAME, original)
        else:
            _patched[module.__name__] = (original, users - 1)


class intercepting:
    """``with intercepting(handler):`` the first dispatcher call made inside goes to
    ``handler(dispatch, query, key, value, attn_mask, args, kwargs)``; later ones (an IP-Adapter's
    second attention) go to the dispatcher. ``called`` says whether the handler ran."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.called = False

    def __enter__(self):
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._token)


def _interceptor(dispatch):
    def dispatch_attention_fn(query, key, value, attn_mask=None, *args, **kwargs):
        scope = _current.get()
        if scope is None or scope.called:
            return dispatch(query, key, value, attn_mask, *args, **kwargs)
        scope.called = True
        return scope.handler(dispatch, query, key, value, attn_mask, args, kwargs)

    dispatch_attention_fn.__wrapped__ = dispatch
    return dispatch_attention_fn


__all__ = ["acquire", "intercepting", "module_of", "release"]

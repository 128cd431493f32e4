"""The one attention processor of sdlens, and the controllers it calls at its named points.

``HookProcessor`` replaces a layer's processor while hooks are attached. It knows nothing of
recording or editing: at each named point it calls the controllers attached to that layer, and a
controller's return value replaces the tensor (None leaves it as it is).

Named points, in the order they are reached:

- ``qkv(call, q, k, v)``: per-head queries ``(b, heads, n, d)``, keys and values ``(b, heads, keys, d)``;
  return ``(q, k, v)`` to replace them (self-attention injection, mutual self-attention).
- ``probs(call, p)``: the attention probabilities ``(b, heads, n, keys)`` in float32; return a tensor
  to replace them (replace, refine, reweight). Reached only where a controller that edits them
  is active: the layer then computes an explicit softmax and ``p @ v``.
- ``heads_out(call, hidden)``: joint (SD 3) layers only, observers only: the attention's output per
  head ``(b, heads, n_img + n_text (+ concepts), d)``, before the output projections.
- ``out(call, out)``: the layer's output (for a joint layer the pair ``(image, text)``); return a
  replacement.

At each point the editing controllers (``edits = True``) run first, in the order attached, then
the observers see the result. A layer whose active controllers only observe keeps diffusers' own
SDPA computation (``AttnProcessor2_0`` op for op: bit-identical output) and hands over the
queries and keys it made, without projecting twice. SD 3's joint layers (``JointAttnProcessor2_0``)
are run the same way, op for op (``attention.joint_inputs`` / ``joint_output``): their queries are
the image's then the text's, their keys too (``Call.n_img_keys`` says where the image's end), and
concept tokens riding at the end of the text stream (``Run.n_concepts``) get an attention of their
own that no image or text query sees. A layer whose processor is another (a user's own) is run by
its own processor; observers of ``qkv`` then get queries and keys recomputed for the rows they ask
for, and editing such a layer is refused. A processor that calls diffusers' attention dispatcher
(Flux's, and most newer models') runs itself, and the named points are reached from inside its
dispatcher call (``hooks.dispatch``): queries and keys as it made them (rotary positions applied),
in SD 3's order (image, then text) whatever the layer's own, explicit probabilities where an
editor is active, and the dispatcher's own backend everywhere else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

from ..errors import CaptureError
from . import dispatch
from .attention import (
    JointInputs,
    attention_probs,
    concept_attention,
    joint_inputs,
    joint_output,
    queries_and_keys,
    sdpa,
    sdpa_inputs,
    sdpa_output,
)

if TYPE_CHECKING:
    from .layers import LayerInfo
    from .run import Run


class Controller:
    """Base of everything attached to the hooks (capture, the edits). Override what you need.

    Life of a controller in one ``attach`` (see ``attach.Attachment``):
    ``open(run)`` on entering; ``layers(run)`` at the denoiser's first call (batch, map sizes and step
    count are known), returning the names of the layers to hook; ``begin_step(run)`` and
    ``end_step(run)`` around each denoiser call; the named points while ``active`` is True; and
    ``close(run, error)`` on leaving, always (``error`` is the exception that ended the run, if any).
    """

    edits = False  # True: its return values at the named points may replace tensors
    active = True  # set per step by the controller; the processor calls inactive controllers at no point

    def open(self, run: Run) -> None:
        pass

    def layers(self, run: Run) -> list[str]:
        return []

    def begin_step(self, run: Run) -> None:
        pass

    def end_step(self, run: Run) -> None:
        pass

    def close(self, run: Run, error: BaseException | None) -> None:
        pass

    def rows(self, run: Run) -> list[int] | None:
        """Batch rows this controller needs at ``qkv`` where queries and keys must be recomputed
        (a layer run by its own processor); None: every row."""
        return None

    # named points: return None to leave the tensor as it is
    def qkv(self, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None):
        return None

    def probs(self, call: Call, p: torch.Tensor):
        return None

    def heads_out(self, call: Call, hidden: torch.Tensor):
        return None

    def out(self, call: Call, out: torch.Tensor):
        return None

    def context_tokens(self, run: Run, context: torch.Tensor) -> torch.Tensor | None:
        """Tokens ``(b, C, width)`` to append to the denoiser's text input at every step (concept
        tokens, SD 3); None: nothing. Asked at each denoiser call, before the layers run."""
        return None


def _overrides(controller: Controller, point: str) -> bool:
    return getattr(type(controller), point) is not getattr(Controller, point)


@dataclass
class Call:
    """One call of a hooked layer, as the controllers see it."""

    layer: LayerInfo
    attn: torch.nn.Module
    step: int
    batch: int  # rows of the denoiser's batch
    scale: float  # the softmax scale of q·kᵀ
    bias: torch.Tensor | None = None  # the additive or boolean mask, broadcastable to (b, heads, n, keys)
    n_img_keys: int = 0  # joint layers: the first n keys are the image's
    rows: list[int] | None = None  # batch rows the tensors hold (None: all, in batch order)
    explicit: bool = False  # probabilities are computed explicitly at this call (an editor is active)
    n_img_queries: int | None = None  # joint layers: the first n queries are the image's, the rest the text's
    n_concepts: int = 0  # joint layers: concept tokens after the text's (in heads_out's hidden only)
    concept_inputs: JointInputs | None = None  # with concepts: their queries and keys, for ``concept_probs``


class HookProcessor:
    """Calls the attached controllers at a layer's named points; otherwise the layer's own processor."""

    def __init__(self, run: Run, info: LayerInfo, original, controllers: list[Controller]) -> None:
        self.run = run
        self.info = info
        self.original = original
        self.controllers = controllers
        self._rows: dict[tuple, list[int] | None] = {}  # (observers, batch) -> the rows they need
        # diffusers passes a processor only the cross_attention_kwargs its __call__ names, so show it
        # the original's signature: a hooked run then receives exactly the arguments of an unhooked one.
        def call(attn, hidden_states, *args, **kwargs):
            return self(attn, hidden_states, *args, **kwargs)

        call.__signature__ = inspect.signature(original.__call__)  # computed once, not per call
        self.__call__ = call
        # diffusers' default SDPA processor is re-run op for op (see attention.sdpa_inputs); joint
        # (SD3) layers and any other processor run themselves.
        self.fused = type(original) is AttnProcessor2_0 and info.role in ("cross", "self")
        self.joint = type(original) is JointAttnProcessor2_0 and info.role == "joint"
        # a processor that calls diffusers' attention dispatcher (Flux's): its module, whose dispatcher
        # the attachment intercepts while hooked
        self.dispatch_module = None if (self.fused or self.joint) else dispatch.module_of(original)
        # per named point, its controllers in call order (editors first), sorted once, not per call
        self.points = {p: [c for c in controllers if _overrides(c, p) and c.edits]
                       + [c for c in controllers if _overrides(c, p) and not c.edits]
                       for p in ("qkv", "probs", "heads_out", "out")}
        if not (self.fused or self.joint or self.dispatch_module):
            editors = [type(c).__name__ for c in controllers if c.edits]
            if editors:
                raise CaptureError(
                    f"{', '.join(editors)} cannot edit layer {info.name!r}: its processor is "
                    f"{type(original).__name__}, and attention is edited only on diffusers' AttnProcessor2_0, "
                    "JointAttnProcessor2_0 and processors that call diffusers' attention dispatcher "
                    "(pipe.unet.set_attn_processor(AttnProcessor2_0()) installs the first)"
                )

    def __call__(self, attn, hidden_states, *args, **kwargs):
        context = kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None)
        # concept tokens ride in the text: every joint layer must keep them out of the keys
        concepts = self.run.n_concepts and self.info.role == "joint" and (context is not None or self.info.single_stream)
        if not concepts and not any(c.active for c in self.controllers):
            return self.original(attn, hidden_states, *args, **kwargs)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        if self.dispatch_module is not None:
            out, call = self._dispatched(attn, hidden_states, context, args, kwargs)
        elif self.joint and mask is None and len(args) <= 1 and all(k in _CALL_ARGS for k in kwargs):
            out, call = self._joint(attn, hidden_states, context)
        elif self.fused and len(args) <= 3 and all(k in _CALL_ARGS for k in kwargs):
            out, call = self._fused(attn, hidden_states, context, mask, temb)
        else:
            out = self.original(attn, hidden_states, *args, **kwargs)
            call = self._observe(attn, hidden_states, context, mask, temb)
        outs = _ordered(self.points["out"])
        if outs:
            call = call or Call(self.info, attn, self.run.step, hidden_states.shape[0], 1.0)
            for c in outs:
                new = c.out(call, out)
                out = out if new is None else new
        return out

    def _fused(self, attn, hidden_states, context, mask, temb) -> tuple[torch.Tensor, Call]:
        inputs = sdpa_inputs(attn, hidden_states, context, mask, temb)
        q, k, v = inputs.query, inputs.key, inputs.value
        explicit = any(c.active and c.edits for c in self.points["probs"])
        call = Call(self.info, attn, self.run.step, q.shape[0], q.shape[-1] ** -0.5, inputs.mask, explicit=explicit)
        for c in _ordered(self.points["qkv"]):
            new = c.qkv(call, _no_grad(q), _no_grad(k), _no_grad(v))
            if new is not None:
                q, k, v = new
        if q is not inputs.query or k is not inputs.key or v is not inputs.value:
            inputs = inputs._replace(query=q, key=k, value=v)
        if not explicit:  # observers only: diffusers' SDPA step, bit-identical
            return sdpa_output(attn, sdpa(inputs), inputs), call
        p = attention_probs(q, k, call.scale, inputs.mask)  # (b, heads, n, keys) float32
        for c in _ordered(self.points["probs"]):
            new = c.probs(call, p)
            p = p if new is None else new
        return sdpa_output(attn, (p @ v.float()).to(v.dtype), inputs), call

    def _joint(self, attn, hidden_states, context) -> tuple:
        """``JointAttnProcessor2_0`` op for op, with the named points; concept tokens attend on their own."""
        n_concepts = self.run.n_concepts if context is not None else 0
        inputs = joint_inputs(attn, hidden_states, context, n_concepts)
        q, k, v = inputs.query, inputs.key, inputs.value
        explicit = any(c.active and c.edits for c in self.points["probs"])
        call = Call(self.info, attn, self.run.step, q.shape[0], q.shape[-1] ** -0.5, None, inputs.n_img,
                    explicit=explicit, n_img_queries=inputs.n_img, n_concepts=n_concepts)
        for c in _ordered(self.points["qkv"]):
            new = c.qkv(call, _no_grad(q), _no_grad(k), _no_grad(v))
            if new is not None:
                q, k, v = new
        if not explicit:  # observers only: diffusers' SDPA step, bit-identical
            hidden = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        else:
            p = attention_probs(q, k, call.scale)  # (b, heads, n_img + n_text, keys) float32
            for c in _ordered(self.points["probs"]):
                new = c.probs(call, p)
                p = p if new is None else new
            hidden = (p @ v.float()).to(v.dtype)
        if inputs.concepts is not None:
            hidden = torch.cat([hidden, concept_attention(inputs)], dim=2)
            call.concept_inputs = inputs
        for c in _ordered(self.points["heads_out"]):
            c.heads_out(call, _no_grad(hidden))
        return joint_output(attn, hidden, inputs, context is not None), call

    def _dispatched(self, attn, hidden_states, context, args, kwargs) -> tuple:
        """The layer's own processor, its dispatcher call handed to ``_attend`` (``hooks.dispatch``)."""
        calls = []

        def handler(attend, query, key, value, mask, dargs, dkwargs):
            out, call = self._attend(attn, attend, query, key, value, mask, dargs, dkwargs, context)
            calls.append(call)
            return out

        with dispatch.intercepting(handler) as scope:
            out = self.original(attn, hidden_states, *args, **kwargs)
        if not scope.called:
            raise CaptureError(
                f"layer {self.info.name!r}: its processor {type(self.original).__name__} made no call to diffusers' "
                "attention dispatcher, so sdlens cannot see its attention; trace it with diffusers' own processor"
            )
        return out, calls[0]

    def _attend(self, attn, attend, query, key, value, mask, dargs, dkwargs, context) -> tuple:
        """One dispatcher call of a hooked layer, with the named points: ``(output, Call)``.

        ``query``, ``key``, ``value`` are the dispatcher's ``(b, n, heads, d)``; the controllers get
        ``(b, heads, n, d)`` in SD 3's order (image, then text, for a joint layer); the output is
        the dispatcher's layout in the layer's order (concept tokens' outputs where their inputs were).
        """
        info, run = self.info, self.run
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (b, heads, n, d)
        n_img, n_concepts, order = None, 0, _Order(0, 0, 0, False)
        if info.role == "joint":
            if mask is not None:
                raise CaptureError(f"layer {info.name!r} was called with an attention mask; sdlens traces joint "
                                   "layers without one (call the pipeline without an attention mask)")
            n_ctx = context.shape[1] if context is not None else run.context_len + run.n_concepts
            n_concepts = run.n_concepts
            order = _Order(q.shape[2] - n_ctx, n_ctx - n_concepts, n_concepts, info.text_first)
            n_img = order.n_img
        concepts = order.concepts(q, k, v)
        qc, kc, vc = order.canonical(q), order.canonical(k), order.canonical(v)
        explicit = any(c.active and c.edits for c in self.points["probs"])
        n_img_keys = n_img if n_img is not None else (k.shape[2] if info.role == "self" else 0)
        scale = dkwargs.get("scale") or q.shape[-1] ** -0.5
        call = Call(info, attn, run.step, q.shape[0], scale, mask, n_img_keys, explicit=explicit,
                    n_img_queries=n_img, n_concepts=n_concepts)
        changed = False
        for c in _ordered(self.points["qkv"]):
            new = c.qkv(call, _no_grad(qc), _no_grad(kc), _no_grad(vc))
            if new is not None:
                qc, kc, vc = new
                changed = True
        if explicit:
            p = attention_probs(qc, kc, scale, mask)  # (b, heads, n_img + n_text, keys) float32
            for c in _ordered(self.points["probs"]):
                new = c.probs(call, p)
                p = p if new is None else new
            hidden = order.restore((p @ vc.float()).to(vc.dtype)).transpose(1, 2)
        elif not changed and not n_concepts:  # the processor's own call, untouched: bit-identical
            hidden = attend(query, key, value, mask, *dargs, **dkwargs)
        else:
            q2, k2, v2 = (order.restore(x).transpose(1, 2) for x in (qc, kc, vc))
            hidden = attend(q2, k2, v2, mask, *dargs, **dkwargs)
        heads_out = _ordered(self.points["heads_out"])
        if concepts is None and not heads_out:
            return hidden, call
        conc = None
        if concepts is not None:
            call.concept_inputs = JointInputs(qc, kc, vc, n_img, concepts)
            conc = concept_attention(call.concept_inputs)
        if heads_out:
            both = order.canonical_main(hidden.transpose(1, 2))
            if conc is not None:
                both = torch.cat([both, conc.to(both.dtype)], dim=2)
            for c in heads_out:
                c.heads_out(call, _no_grad(both))
        if conc is not None:
            hidden = order.insert_concepts(hidden, conc.transpose(1, 2).to(hidden.dtype))
        return hidden, call

    def _observe(self, attn, hidden_states, context, mask, temb) -> Call | None:
        """Queries and keys for the ``qkv`` observers of a layer its own processor ran."""
        observers = [c for c in self.points["qkv"] if c.active]
        if not observers:
            return None
        batch = hidden_states.shape[0]
        rows = self._rows_for(observers, batch)
        with torch.no_grad():
            pick = (lambda x: x) if rows is None else _picker(rows, hidden_states.device)
            role = self.info.role
            ctx = None if context is None else pick(context)
            q, k, n_img_keys = queries_and_keys(attn, role, pick(hidden_states), ctx, None if temb is None else pick(temb))
            bias = None
            if mask is not None and role == "cross":
                full = attn.prepare_attention_mask(pick(mask), k.shape[2], q.shape[0])
                bias = full.view(q.shape[0], attn.heads, -1, k.shape[2])
            scale = attn.scale if getattr(attn, "scale", None) is not None else q.shape[-1] ** -0.5
            call = Call(self.info, attn, self.run.step, batch, scale, bias, n_img_keys, rows)
            for c in observers:
                c.qkv(call, q, k, None)
        return call


    def _rows_for(self, controllers: list[Controller], batch: int) -> list[int] | None:
        """The batch rows the ``controllers`` need, sorted (None: all), for a batch of ``batch`` rows."""
        key = (tuple(map(id, controllers)), batch)
        if key not in self._rows:
            wanted: set[int] | None = set()
            for c in controllers:
                rows = c.rows(self.run)
                if rows is None or max(rows, default=-1) >= batch:  # all, or a batch unlike the layout's
                    wanted = None
                    break
                wanted.update(rows)
            self._rows[key] = None if wanted is None or len(wanted) == batch else sorted(wanted)
        return self._rows[key]


_CALL_ARGS = ("encoder_hidden_states", "attention_mask", "temb")


@dataclass(frozen=True)
class _Order:
    """Where a joint layer's image, text and concept tokens sit in its sequence, and the way to and
    from SD 3's order (image, text; concepts held apart). Sizes 0: not a joint layer (no reordering).

    Tensors are ``(b, heads, n, d)``. The layer's order is ``[text, concepts, image]`` when
    ``text_first`` (Flux), else ``[image, text, concepts]``.
    """

    n_img: int
    n_txt: int
    n_concepts: int
    text_first: bool

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's order → image, text (concepts dropped)."""
        if not self.text_first:
            return x[:, :, : x.shape[2] - self.n_concepts] if self.n_concepts else x
        n_ctx = self.n_txt + self.n_concepts
        return torch.cat([x[:, :, n_ctx:], x[:, :, : self.n_txt]], dim=2)

    def canonical_main(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's order without concepts (the main attention's output) → image, text."""
        if not self.text_first:
            return x
        return torch.cat([x[:, :, self.n_txt :], x[:, :, : self.n_txt]], dim=2)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Image, text → the layer's order, without concepts."""
        if not self.text_first:
            return x
        return torch.cat([x[:, :, self.n_img :], x[:, :, : self.n_img]], dim=2)

    def concepts(self, *xs: torch.Tensor) -> tuple | None:
        """The concept tokens' part of each of ``xs``, or None."""
        if not self.n_concepts:
            return None
        start = self.n_txt if self.text_first else self.n_img + self.n_txt
        return tuple(x[:, :, start : start + self.n_concepts] for x in xs)

    def insert_concepts(self, hidden: torch.Tensor, conc: torch.Tensor) -> torch.Tensor:
        """The dispatcher's ``(b, n, heads, d)`` output without concepts → with them, in the layer's order."""
        if not self.text_first:
            return torch.cat([hidden, conc], dim=1)
        return torch.cat([hidden[:, : self.n_txt], conc, hidden[:, self.n_txt :]], dim=1)


def _ordered(controllers: list[Controller]) -> list[Controller]:
    """The active controllers of a point (``HookProcessor.points`` keeps editors before observers)."""
    return [c for c in controllers if c.active]


def _no_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from autograd; as it is when it needs no cutting (pipelines run under no_grad)."""
    return x.detach() if x.requires_grad else x


def _picker(rows: list[int], device):
    index = torch.tensor(rows, device=device)
    return lambda x: x.index_select(0, index)


__all__ = ["Call", "Controller", "HookProcessor"]

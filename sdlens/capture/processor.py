"""The attention processor that records attention probabilities.

Two paths, both giving exactly the image an untraced run gives:

- **fused**, for layers whose original processor is diffusers' ``AttnProcessor2_0`` (the default):
  the layer's own computation, op for op (so the output is bit-identical), which keeps the queries
  and keys it made. Nothing is projected twice.
- **delegating**, for any other processor (a user's custom one, SD3's joint processor, ...): the
  original processor computes the output; the queries and keys of the kept rows are recomputed
  for the maps.

Either way the queries and keys are handed to the recorder, which turns them into probabilities
when the denoiser's call returns (see ``probs``). Steps that are not kept run the original processor
untouched.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange

from .probs import Pending, Rows

if TYPE_CHECKING:
    from .layers import LayerInfo
    from .session import Recorder

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, n, heads·d)`` → ``(b, heads, n, d)``.

    A view and a transpose rather than einops: this runs for every captured layer at every step,
    and einops' pattern handling costs as much as the two ops themselves.
    """
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _no_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from autograd; as it is when it needs no cutting (pipelines run under no_grad)."""
    return x.detach() if x.requires_grad else x


def _project(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, skipping nn.Module's call machinery for a plain, unhooked Linear (hot path).

    A wrapped projection (LoRA), a hooked one, or one whose ``forward`` was replaced (accelerate's
    offloading moves weights in such hooks) is called as the model calls it.
    """
    if (
        type(linear) is torch.nn.Linear
        and not linear._forward_pre_hooks
        and not linear._forward_hooks
        and "forward" not in linear.__dict__
    ):
        return F.linear(x, linear.weight, linear.bias)
    return linear(x)


def _image_tokens(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """The layer's query input as ``(b, n, c)``, after the norms diffusers applies before ``to_q``."""
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def queries_and_keys(
    attn, role: str, hidden_states: torch.Tensor, context: torch.Tensor | None, temb: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-head queries ``(b, heads, n, d)`` and keys ``(b, heads, k, d)`` of one attention call.

    For a joint (SD3) layer the keys are the image's followed by the text's, as in diffusers'
    joint processor; the returned int is the number of image keys (0 for plain cross-attention).
    """
    x = _image_tokens(attn, hidden_states, temb)
    q = _heads(_project(attn.to_q, x), attn.heads)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if role == "joint":
        k_img = _heads(_project(attn.to_k, x), attn.heads)
        if getattr(attn, "norm_k", None) is not None:
            k_img = attn.norm_k(k_img)
        if context is None:
            return q, k_img, k_img.shape[2]
        k_txt = _heads(attn.add_k_proj(context), attn.heads)
        if getattr(attn, "norm_added_k", None) is not None:
            k_txt = attn.norm_added_k(k_txt)
        return q, torch.cat([k_img, k_txt], dim=2), k_img.shape[2]
    if role == "cross" and context is not None:
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        src = context
    else:
        src = x
    k = _heads(_project(attn.to_k, src), attn.heads)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k, (k.shape[2] if role == "self" else 0)


def sdpa_forward(
    attn, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """diffusers' ``AttnProcessor2_0`` step for step, also returning what it attended with.

    Returns the layer's output (exactly the original processor's), the per-head queries
    ``(b, heads, n, d)`` and keys ``(b, heads, k, d)``, and the additive mask ``(b, heads, 1 | n, k)``
    SDPA was given (or None). SDPA scales scores by ``d ** -0.5``, whatever ``attn.scale`` says.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    b, seq, _ = hidden_states.shape if context is None else context.shape
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, seq, b)
        mask = mask.view(b, attn.heads, -1, mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    value = attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    out = out / attn.rescale_output_factor
    return out, query, key, mask


_CALL_ARGS = ("encoder_hidden_states", "attention_mask", "temb")


class CaptureProcessor:
    """Wraps a layer's original processor; records that layer's attention while its step is kept."""

    def __init__(self, recorder: Recorder, info: LayerInfo, original) -> None:
        self.recorder = recorder
        self.info = info
        self.original = original
        # diffusers passes a processor only the cross_attention_kwargs its __call__ names, so show it
        # the original's signature: a traced run then receives exactly the arguments of an untraced one.
        def call(attn, hidden_states, *args, **kwargs):
            return self(attn, hidden_states, *args, **kwargs)

        call.__signature__ = inspect.signature(original.__call__)  # computed once, not per call
        self.__call__ = call
        # diffusers' default SDPA processor is re-run op for op (see sdpa_forward); joint (SD3)
        # layers and any other processor are delegated to.
        self.fused = type(original) is AttnProcessor2_0 and info.role in ("cross", "self")
        self.kinds = recorder.kinds_at.get(info.name, recorder.spec.kinds)  # what is kept at this layer

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not self.recorder.keeping:
            return self.original(attn, hidden_states, *args, **kwargs)
        context = kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        if self.fused and len(args) <= 3 and all(k in _CALL_ARGS for k in kwargs):
            out, q, k, bias = sdpa_forward(attn, hidden_states, context, mask, temb)
            # the whole batch is handed over; the kept rows are taken when the step's layers are batched
            rows = self.recorder.kept_rows(q.shape[0], q.device)
            self.keep(_no_grad(q), _no_grad(k), q.shape[-1] ** -0.5, bias, 0, rows)
            return out
        out = self.original(attn, hidden_states, *args, **kwargs)
        with torch.no_grad():
            self.record(attn, hidden_states, context, mask, temb)
        return out

    def record(self, attn, hidden_states, context, mask, temb) -> None:
        rec, role = self.recorder, self.info.role
        pick = rec.row_picker(hidden_states.shape[0], hidden_states.device)  # the kept CFG rows
        hidden_states = pick(hidden_states)
        context = None if context is None else pick(context)
        temb = None if temb is None else pick(temb)
        q, k, n_img_keys = queries_and_keys(attn, role, hidden_states, context, temb)
        bias = None
        if mask is not None and role == "cross":
            full = attn.prepare_attention_mask(pick(mask), k.shape[2], q.shape[0])
            bias = full.view(q.shape[0], attn.heads, -1, k.shape[2])
        scale = attn.scale if getattr(attn, "scale", None) is not None else q.shape[-1] ** -0.5
        self.keep(q, k, scale, bias, n_img_keys, None)

    def keep(self, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
             n_img_keys: int, rows: Rows) -> None:
        """Hand queries ``(b, heads, n, d)`` and keys ``(b, heads, k, d)`` to the recorder, which turns
        the kept ``rows`` of them (None: all, already picked) into probabilities when the denoiser's
        call ends, batched over layers of the same shape: far fewer ops per step than one softmax
        per layer."""
        self.recorder.defer(Pending(self, q, k, scale, bias, n_img_keys, rows))

    def store(self, probs: torch.Tensor, n_img_keys: int) -> None:
        """Store this layer's probabilities ``(rows, heads kept or 1, n, keys)`` of the current step."""
        if self.info.role == "joint":
            parts = {"self": probs[..., :n_img_keys], "cross": probs[..., n_img_keys:]}
        else:
            parts = {self.info.role: probs}
        for kind, p in parts.items():
            if kind in self.kinds:
                self.recorder.store(kind, self.info, p)

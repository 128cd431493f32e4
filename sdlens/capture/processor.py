"""The attention processor that records attention probabilities.

It *delegates* the layer's output to the processor that was installed before (diffusers' SDPA
processor, or whatever custom processor the user had), so a traced run computes exactly the same
image, and it recomputes only what is needed for the maps: queries and keys of the CFG rows being
kept, then an explicit softmax, in query chunks so that large self-attention maps never need one
huge temporary.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from .layers import LayerInfo
    from .session import Recorder

# Elements of one float32 score chunk (rows × heads × queries × keys): 32 Mi = 128 MB.
CHUNK_ELEMENTS = 1 << 25


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, n, heads·d)`` → ``(b, heads, n, d)``.

    A view and a transpose rather than einops: this runs for every captured layer at every step,
    and einops' pattern handling costs as much as the two ops themselves.
    """
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _project(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, skipping nn.Module's call machinery for a plain Linear (hot path)."""
    if type(linear) is torch.nn.Linear:
        return F.linear(x, linear.weight, linear.bias)
    return linear(x)  # e.g. a LoRA-wrapped projection: call it as the model does


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


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention ``(b, heads, n, k)`` in float32, computed in query chunks.

    ``mask`` is an additive bias broadcastable to ``(b, heads, n, k)``. Scores are formed in float32
    (half-precision scores would cost probabilities ~1% of their value); few ops per chunk, since this
    runs for every captured layer at every step.
    """
    b, h, n, _ = q.shape
    kk = k.shape[2]
    q = q.float() * scale
    kt = k.float().transpose(-1, -2)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * kk))
    if chunk >= n:  # the common case: one chunk
        scores = q @ kt
        if mask is not None:
            scores = scores + mask.float()
        return scores.softmax(dim=-1)
    out = torch.empty(b, h, n, kk, dtype=torch.float32, device=q.device)
    for s in range(0, n, chunk):
        scores = q[:, :, s : s + chunk] @ kt
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, s : s + chunk]).float()
        out[:, :, s : s + chunk] = scores.softmax(dim=-1)
    return out


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

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.original(attn, hidden_states, *args, **kwargs)
        if self.recorder.keeping:
            context = kwargs.get("encoder_hidden_states", args[0] if len(args) > 0 else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
            with torch.no_grad():
                self.record(attn, hidden_states, context, mask, temb)
        return out

    def record(self, attn, hidden_states, context, mask, temb) -> None:
        rec, role = self.recorder, self.info.role
        pick = rec.row_picker(hidden_states.shape[0])  # the kept CFG rows: a slice (a view) when contiguous
        hidden_states = pick(hidden_states)
        context = None if context is None else pick(context)
        temb = None if temb is None else pick(temb)
        q, k, n_img_keys = queries_and_keys(attn, role, hidden_states, context, temb)
        bias = None
        if mask is not None and role == "cross":
            full = attn.prepare_attention_mask(pick(mask), k.shape[2], q.shape[0])
            bias = full.view(q.shape[0], attn.heads, -1, k.shape[2])
        scale = attn.scale if getattr(attn, "scale", None) is not None else q.shape[-1] ** -0.5
        probs = attention_probs(q, k, scale, bias)
        if role == "joint":
            parts = {"self": probs[..., :n_img_keys], "cross": probs[..., n_img_keys:]}
        else:
            parts = {role: probs}
        for kind, p in parts.items():
            if kind in rec.spec.kinds:
                rec.store(kind, self.info, p)

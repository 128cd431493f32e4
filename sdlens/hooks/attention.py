"""The attention computation itself: diffusers' SDPA step in two halves, queries and keys of any
layer, and explicit float32 probabilities.

``sdpa_inputs`` and ``sdpa_output`` are diffusers' ``AttnProcessor2_0`` step for step, split where
the hooks' named points sit (the queries, keys and values; the probabilities; the output), so a
hooked layer with nothing to edit gives bit-identical output and projects nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

# Elements of one float32 score chunk (rows × heads × queries × keys): 8 Mi = 32 MB, of which a few
# are alive at once. SD 1.5's 64×64 self-attention (8 heads, 4096 keys) then takes 256 queries a chunk.
CHUNK_ELEMENTS = 1 << 23


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, n, heads·d)`` → ``(b, heads, n, d)``.

    A view and a transpose rather than einops: this runs for every hooked layer at every step,
    and einops' pattern handling costs as much as the two ops themselves.
    """
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


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
    """Per-head queries ``(b, heads, n, d)`` and keys ``(b, heads, k, d)`` of one attention call of any
    processor (recomputed from the layer's projections).

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


class SdpaInputs(NamedTuple):
    """What ``AttnProcessor2_0`` attends with, and what its output step needs."""

    query: torch.Tensor  # (b, heads, n, d)
    key: torch.Tensor  # (b, heads, keys, d)
    value: torch.Tensor  # (b, heads, keys, d)
    mask: torch.Tensor | None  # additive or boolean, (b, heads, 1 | n, keys)
    residual: torch.Tensor
    spatial: tuple[int, int, int, int] | None  # (b, c, h, w) of a 4-d input, else None


def sdpa_inputs(attn, hidden_states, context, mask, temb) -> SdpaInputs:
    """The first half of diffusers' ``AttnProcessor2_0``: norms, projections, heads, mask."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        spatial = (b, c, h, w)
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
    return SdpaInputs(query, key, value, mask, residual, spatial)


def sdpa_output(attn, hidden: torch.Tensor, inputs: SdpaInputs) -> torch.Tensor:
    """The second half: heads ``(b, heads, n, d)`` merged, output projection, residual, rescale."""
    b, heads, _, d = hidden.shape
    out = hidden.transpose(1, 2).reshape(b, -1, heads * d).to(inputs.query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if inputs.spatial is not None:
        out = out.transpose(-1, -2).reshape(*inputs.spatial)
    if attn.residual_connection:
        out = out + inputs.residual
    return out / attn.rescale_output_factor


def sdpa(inputs: SdpaInputs) -> torch.Tensor:
    """diffusers' attention step: ``(b, heads, n, d)``."""
    return F.scaled_dot_product_attention(
        inputs.query, inputs.key, inputs.value, attn_mask=inputs.mask, dropout_p=0.0, is_causal=False
    )


class JointInputs(NamedTuple):
    """What diffusers' ``JointAttnProcessor2_0`` (SD 3's MMDiT) attends with: image tokens, then text tokens.

    ``query``, ``key``, ``value`` are ``(b, heads, n_img + n_text, d)``; ``concepts`` holds the
    queries, keys and values ``(b, heads, C, d)`` of concept tokens riding at the end of the text
    stream (kept out of the joint keys by ``joint_inputs``), or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    n_img: int
    concepts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def joint_inputs(attn, hidden_states: torch.Tensor, context: torch.Tensor | None, n_concepts: int = 0) -> JointInputs:
    """The first half of ``JointAttnProcessor2_0``: projections, heads, norms, image and text joined.

    The last ``n_concepts`` tokens of ``context`` are concept tokens: they are projected with the
    text stream's weights but kept out of the joint keys, so image and text see exactly what they
    see without them.
    """
    b = hidden_states.shape[0]

    def heads(x):
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    n_img = query.shape[2]
    if context is None:
        return JointInputs(query, key, value, n_img, None)
    cq, ck, cv = heads(attn.add_q_proj(context)), heads(attn.add_k_proj(context)), heads(attn.add_v_proj(context))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    concepts = None
    if n_concepts:
        n_text = cq.shape[2] - n_concepts
        concepts = (cq[:, :, n_text:], ck[:, :, n_text:], cv[:, :, n_text:])
        cq, ck, cv = cq[:, :, :n_text], ck[:, :, :n_text], cv[:, :, :n_text]
    return JointInputs(
        torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2), torch.cat([value, cv], dim=2), n_img, concepts
    )


def concept_attention(inputs: JointInputs) -> torch.Tensor:
    """Concept tokens' attention ``(b, heads, C, d)``: their queries over the image's keys and their own.

    No image or text query ever sees a concept key, so concepts leave the picture as it is.
    """
    cq, ck, cv = inputs.concepts
    n = inputs.n_img
    k = torch.cat([inputs.key[:, :, :n], ck], dim=2)
    v = torch.cat([inputs.value[:, :, :n], cv], dim=2)
    return F.scaled_dot_product_attention(cq, k, v, dropout_p=0.0, is_causal=False)


def concept_probs(inputs: JointInputs) -> torch.Tensor:
    """The concept tokens' attention probabilities ``(b, heads, C, n_img + C)``, float32: each concept
    query's row over the image's keys, then the concepts' own (what ``concept_attention`` weighs its
    values by). The first ``n_img`` columns say where in the image a concept looks.
    """
    cq, ck, _ = inputs.concepts
    n = inputs.n_img
    k = torch.cat([inputs.key[:, :, :n], ck], dim=2)
    return attention_probs(cq, k, cq.shape[-1] ** -0.5)


def joint_output(attn, hidden: torch.Tensor, inputs: JointInputs, has_context: bool):
    """The second half: heads merged, image and text split, each stream's output projection.

    ``hidden`` is ``(b, heads, n_img + n_text (+ C), d)``; returns ``image`` or ``(image, text)`` as
    ``JointAttnProcessor2_0`` does.
    """
    b, heads, _, d = hidden.shape
    out = hidden.transpose(1, 2).reshape(b, -1, heads * d).to(inputs.query.dtype)
    if not has_context:
        out = attn.to_out[1](attn.to_out[0](out))
        return out
    image, text = out[:, : inputs.n_img], out[:, inputs.n_img :]
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    image = attn.to_out[1](attn.to_out[0](image))
    return image, text


def sdpa_forward(attn, hidden_states, context, mask, temb):
    """``AttnProcessor2_0`` whole, also returning what it attended with: ``(out, query, key, mask)``.

    SDPA scales scores by ``d ** -0.5``, whatever ``attn.scale`` says.
    """
    inputs = sdpa_inputs(attn, hidden_states, context, mask, temb)
    return sdpa_output(attn, sdpa(inputs), inputs), inputs.query, inputs.key, inputs.mask


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax attention ``(b, heads, n, k)`` in float32, computed in query chunks.

    ``mask`` is an additive bias, or a boolean mask (True: may attend) as SDPA takes, broadcastable
    to ``(b, heads, n, k)``. ``reduce`` (e.g. the mean over heads) is applied to each chunk of
    probabilities as it is made, so that a large map is never held with all its heads: the result
    is then ``reduce``'s shape, ``(b, heads', n, k)``. Scores are formed in float32 (half-precision
    scores would cost probabilities ~1% of their value); few ops per chunk, since this runs for
    every captured layer at every step.
    """
    b, h, n, _ = q.shape
    kk = k.shape[2]
    if mask is not None and mask.dtype == torch.bool:  # SDPA's boolean masks: True = may attend
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    q = q.float() * scale
    kt = k.float().transpose(-1, -2)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * kk))
    out = None
    for s in range(0, n, chunk):
        scores = q @ kt if chunk >= n else q[:, :, s : s + chunk] @ kt  # the common case: one chunk
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 or chunk >= n else mask[:, :, s : s + chunk]).float()
        probs = scores.softmax(dim=-1)
        del scores  # before the next chunk's scores are made
        if reduce is not None:
            probs = reduce(probs)
        if chunk >= n:
            return probs
        if out is None:
            out = torch.empty(probs.shape[0], probs.shape[1], n, kk, dtype=probs.dtype, device=probs.device)
        out[:, :, s : s + chunk] = probs
        del probs
    return out


__all__ = [
    "CHUNK_ELEMENTS",
    "JointInputs",
    "SdpaInputs",
    "concept_attention",
    "concept_probs",
    "joint_inputs",
    "joint_output",
    "attention_probs",
    "queries_and_keys",
    "sdpa",
    "sdpa_forward",
    "sdpa_inputs",
    "sdpa_output",
]

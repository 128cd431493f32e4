"""A reference for the maps: diffusers' own explicit-softmax processor, keeping what it computes."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor


class RecordingReference(AttnProcessor):
    """diffusers' ``AttnProcessor`` (explicit softmax), storing each call's probabilities
    ``(batch·heads, n, keys)`` under its layer's name in ``store``."""

    def __init__(self, store: dict, name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(hidden_states if encoder_hidden_states is None else encoder_hidden_states))
        self.store.setdefault(self.name, []).append(attn.get_attention_scores(q, k, attention_mask))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def reference_cross_maps(pipe, run) -> dict[str, torch.Tensor]:
    """``run()`` with every cross-attention layer's processor replaced by ``RecordingReference``:
    ``{layer: (steps, batch·heads, n, keys)}``; the processors are put back afterwards."""
    denoiser = pipe.unet
    original = dict(denoiser.attn_processors)
    store: dict = {}
    procs = {k: (RecordingReference(store, k.removesuffix(".processor")) if k.endswith("attn2.processor") else v)
             for k, v in original.items()}
    denoiser.set_attn_processor(procs)
    try:
        run()
    finally:
        denoiser.set_attn_processor(dict(original))
    return {name: torch.stack(ps) for name, ps in store.items()}

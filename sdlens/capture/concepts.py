"""Concept tokens (ConceptAttention, Helbling et al. 2025): words that ride through an MMDiT's joint
blocks beside the prompt, without changing the picture, and say where in the image each one is.

How it goes here (our implementation of the method, on the hooks):

1. Each concept (a word such as "circle") is encoded by the pipeline's own text encoders as a
   prompt of its own; its word's slot vectors (mean over its tokens; the T5 part when the pipeline
   has a T5 — Flux's text is T5's alone — else the CLIP part) are one concept token ``(width,)``
   (``embed_concepts``).
2. At every step the concept tokens are appended to the denoiser's text input
   (``Controller.context_tokens``), so each block's text-stream weights (adaLN, projections, MLP)
   process them like text tokens, and their residual stream is carried from block to block.
3. In each joint layer the image and text queries attend exactly as without concepts (no concept
   key is visible to them: the picture is unchanged); concept queries attend over the image's keys
   and the concepts' own, not the prompt's (``hooks.attention.concept_attention``).
4. The map of one layer and step is the dot product of each pixel's attention output with each
   concept's, both before the output projection, all heads side by side (``concept_scores``):
   ``(rows, pixels, concepts)``. A trace keeps these raw scores (kind ``"concept"``);
   ``AttentionTrace.concept_map`` takes a softmax over the concepts per layer and step, then the
   mean over layers and steps (the order of the paper's segmentation code).
5. The same trace keeps where each concept token looks: its query's attention probabilities over
   the image's keys (``hooks.attention.concept_probs``, heads averaged), kind ``"concept_image"``,
   read by ``concept_map(..., space="attention")``. On the built-in tiny-sd3 these find the objects
   where the output-space maps do not, but any object, not the concept's own (README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

from ..errors import CaptureError


def check_concepts(concepts) -> list[str] | None:
    """``concepts=`` as given to ``sdlens.trace``: None, or a non-empty list of distinct, non-empty words."""
    if concepts is None:
        return None
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts)
    if not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise CaptureError(f"concepts must be a non-empty list of words, e.g. ['circle', 'square', 'background']; "
                           f"got {concepts!r}")
    if len(set(concepts)) != len(concepts):
        raise CaptureError(f"concepts must be distinct; got {concepts!r}")
    return concepts


@torch.no_grad()
def embed_concepts(pipe, concepts: Sequence[str], device, dtype) -> torch.Tensor:
    """Concept tokens ``(C, width)`` in the denoiser's text-input space, by the pipeline's own encoders.

    Called while the pipeline's ``encode_prompt`` may be wrapped by a trace: the class's method is
    used, so the concepts are not taken for the run's prompt.
    """
    if pipe is None or not hasattr(pipe, "encode_prompt") or getattr(pipe, "tokenizer", None) is None:
        raise CaptureError("concepts= needs a pipeline with its text encoders (not a bare denoiser)")
    import inspect

    from ..hooks.layers import is_flux
    from ..tokens import tokenize

    flux = is_flux(getattr(pipe, "transformer", None))
    accepts = inspect.signature(type(pipe).encode_prompt).parameters
    extra = {k: v for k, v in (("prompt_2", None), ("prompt_3", None), ("do_classifier_free_guidance", False))
             if k in accepts}
    tokens = []
    for concept in concepts:
        embeds = type(pipe).encode_prompt(pipe, prompt=concept, device=device, **extra)[0][0]  # (slots, width)
        if flux:  # the text keys are T5's slots only
            slots = _word_slots(tokenize(concept, pipe.tokenizer_2, max_length=embeds.shape[0]))
        elif getattr(pipe, "text_encoder_3", None) is not None:  # SD 3: 77 CLIP slots, then T5's
            clip_len = pipe.tokenizer.model_max_length
            t5 = tokenize(concept, pipe.tokenizer_3, max_length=embeds.shape[0] - clip_len)
            slots = [clip_len + s for s in _word_slots(t5)]
        else:
            slots = _word_slots(tokenize(concept, pipe.tokenizer))
        tokens.append(embeds[slots].mean(dim=0))
    return torch.stack(tokens).to(device=device, dtype=dtype)


def _word_slots(tok) -> list[int]:
    """The slots of a concept's words (its start token's when it has none, e.g. an empty concept)."""
    return [s for word in tok.word_tokens for s in word] or [0]


def concept_scores(hidden: torch.Tensor, n_img: int, n_concepts: int) -> torch.Tensor:
    """``(b, heads, n_img + n_text + C, d)`` attention outputs -> ``(b, n_img, C)`` dot products, float32."""
    image = rearrange(hidden[:, :, :n_img].float(), "b h n d -> b n (h d)")
    concepts = rearrange(hidden[:, :, -n_concepts:].float(), "b h c d -> b c (h d)")
    return image @ concepts.transpose(1, 2)


__all__ = ["check_concepts", "concept_scores", "embed_concepts"]

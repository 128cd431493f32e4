"""The training data: fresh batches of the shapes world, and their captions as CLIP token ids."""

from __future__ import annotations

import torch

from .budget import Budget
from .run import Run


class CaptionTokens:
    """Captions -> (N, 77) CLIP token ids, as the pipeline tokenizes prompts; cached per caption.

    The world has a few hundred distinct captions, so after the first batches this is a lookup.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
            ).input_ids
            self.cache.update(zip(missing, ids))
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long)


def sample(run: Run, budget: Budget, generator: torch.Generator):
    """A fresh batch of the shapes world on the training device: images (N, 3, 64, 64) in [-1, 1], captions."""
    from sdlens.world import sample_batch

    images, captions, _scenes, _masks = sample_batch(
        budget.batch_size,
        generator=generator,
        size=run.cfg.image_size,
        two_object_prob=run.cfg.two_object_prob,
        device=run.device,
        free_prob=run.cfg.free_position_prob,
        size_prob=run.cfg.size_word_prob,
    )
    return images, captions


def world_token_ids(tokenizer) -> list[int]:
    """The token ids the shapes world's captions use, plus the start and end (= padding) tokens."""
    from sdlens.world import VOCAB_WORDS

    ids = tokenizer(
        " ".join(VOCAB_WORDS), padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    return sorted(set(ids))


__all__ = ["CaptionTokens", "sample", "world_token_ids"]

"""The exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's weights: what gets exported, as in most diffusion training.

    The average forgets with `decay` per step; early on it uses (1 + step) / (10 + step), so that
    it is not dragged towards the random initialisation in short runs.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # ema <- ema + (1 - decay) * (param - ema), all tensors in one fused call
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - decay)

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for e, p in zip(self.params, model.parameters()):
                p.copy_(e)

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averages, in eval mode, without gradients: what gets exported."""
        out = frozen_copy(model)
        self.copy_to(out)
        return out

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"params": self.params}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        for e, saved in zip(self.params, state["params"]):
            e.copy_(saved)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, without gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


__all__ = ["EMA", "frozen_copy"]

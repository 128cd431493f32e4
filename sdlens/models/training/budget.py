"""How long each training stage runs: its steps and/or minutes, batch size and learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from sdlens.errors import ModelError

STAGES = ("clip", "vae", "unet")
# every stage's place in the seed of its data and noise generator (the SD3-style model's denoiser
# stage, "transformer", is trained by sdlens.models.mmdit)
STAGE_SEEDS = {"clip": 0, "vae": 1, "unet": 2, "transformer": 3}


@dataclass
class Budget:
    """How long one stage trains: until `steps` or `minutes`, whichever comes first (None: no limit)."""

    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ModelError("a stage budget needs steps or minutes (or both)")
        if self.batch_size < 1:
            raise ModelError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr >= 0:  # 0 is allowed: a run that changes nothing, as the tests use
            raise ModelError(f"learning rate must be 0 or more, got {self.lr}")


DEFAULT_BUDGETS: dict[str, Budget] = {
    "clip": Budget(steps=3000, batch_size=256, lr=1e-3),
    "vae": Budget(steps=3000, batch_size=128, lr=1e-3),
    "unet": Budget(steps=30000, batch_size=256, lr=5e-4, warmup_steps=200),
}


__all__ = ["DEFAULT_BUDGETS", "STAGES", "STAGE_SEEDS", "Budget"]

"""``StageLoop``: the bookkeeping every stage shares, so that each training loop shows only the learning."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdlens.errors import ModelError

from .budget import STAGE_SEEDS, Budget
from .ema import EMA
from .run import Run


class StageLoop:
    """The bookkeeping of one stage, so that the training loops show only the learning.

    - `running()`: False once the stage's step or time budget is spent;
    - `lr()`: the learning rate for this step: linear warm-up, then cosine decay to 10% of the
      peak over the budget (the budget's steps or minutes, whichever is further along);
    - `end_step(loss)`: counts the step, updates the progress bar, writes the loss log every
      `log_every` steps (reading the loss off the GPU only then) and saves a checkpoint every
      `checkpoint_minutes`;
    - `close()`: saves the last checkpoint.

    With ``run.resume`` and a checkpoint on disk, the modules, optimiser, EMA, step count and
    elapsed time are restored first, and the stage continues where it stopped (it trains on
    only if the budget, perhaps raised, is not yet spent). The data and noise generator is
    seeded afresh from (seed, stage, step) at every step, so a resumed run ends with the weights
    an uninterrupted run over the same steps would have (tested for tiny-sd3).
    """

    def __init__(
        self,
        run: Run,
        stage: str,
        budget: Budget,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        emas: dict[str, EMA] | None = None,
    ) -> None:
        self.run, self.stage, self.budget = run, stage, budget
        self.modules, self.optimizer, self.emas = modules, optimizer, emas or {}
        self.step, self.elapsed_before = 0, 0.0
        path = run.checkpoint_path(stage)
        if run.resume and path.exists():
            self._load(path)
            print(f"[{stage}] resumed from {path} at step {self.step}", file=sys.stderr)
        self.seed_base = run.seed * 1_000_003 + STAGE_SEEDS[stage] * 10_007
        self.generator = torch.Generator(run.device).manual_seed(self.seed_base + self.step)
        self.start = time.monotonic()
        self.last_checkpoint = self.start
        self.loss_sum = torch.zeros((), device=run.device)
        self.loss_count = 0
        self.last_lr = self.lr()
        self.steps_at_start = self.step
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=budget.steps, initial=self.step, desc=stage, disable=not run.progress, dynamic_ncols=True
        )

    def elapsed(self) -> float:
        """Seconds trained in this stage, earlier runs included."""
        return self.elapsed_before + time.monotonic() - self.start

    def progress(self) -> float:
        """How far through the budget the stage is, 0..1."""
        parts = []
        if self.budget.steps is not None:
            parts.append(self.step / max(1, self.budget.steps))
        if self.budget.minutes is not None:
            parts.append(self.elapsed() / max(1e-9, 60 * self.budget.minutes))
        return min(1.0, max(parts))

    def running(self) -> bool:
        return self.progress() < 1.0

    def lr(self) -> float:
        warmup = min(1.0, (self.step + 1) / max(1, self.budget.warmup_steps))
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress()))
        return self.budget.lr * warmup * cosine

    def set_lr(self) -> float:
        lr = self.last_lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_step(self, loss: torch.Tensor) -> None:
        self.step += 1
        # each step's data and noise come from (seed, stage, step): a resumed run draws what an
        # uninterrupted one would have drawn
        self.generator.manual_seed(self.seed_base + self.step)
        self.loss_sum += loss.detach().float()
        self.loss_count += 1
        self.bar.update(1)
        if self.step % self.run.log_every == 0 or not self.running():
            self._write_log()
        if time.monotonic() - self.last_checkpoint > 60 * self.run.checkpoint_minutes:
            self.save()

    def _write_log(self) -> None:
        if self.loss_count == 0:
            return
        mean_loss = self.loss_sum.item() / self.loss_count  # the only GPU -> CPU sync of the loop
        entry = {
            "stage": self.stage,
            "step": self.step,
            "loss": round(mean_loss, 6),
            "lr": self.last_lr,
            "elapsed_s": round(self.elapsed(), 2),
        }
        self.run.log(entry)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{entry['lr']:.1e}")
        self.loss_sum.zero_()
        self.loss_count = 0

    def save(self) -> None:
        state = {
            "stage": self.stage,
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "config": self.run.cfg.to_dict(),
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "emas": {name: e.state_dict() for name, e in self.emas.items()},
        }
        path = self.run.checkpoint_path(self.stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves half a checkpoint
        self.last_checkpoint = time.monotonic()

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.run.device, weights_only=True)  # no arbitrary unpickling
        if state["config"] != self.run.cfg.to_dict():
            raise ModelError(
                f"the checkpoint {path} was made with another config; resume with the same options, "
                f"or start a new run in another --out folder"
            )
        for name, m in self.modules.items():
            m.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, e in self.emas.items():
            e.load_state_dict(state["emas"][name])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]

    def close(self) -> None:
        self._write_log()
        self.save()
        self.bar.close()
        trained = self.step - self.steps_at_start
        self.run.stage_reports[self.stage] = {
            "steps": self.step,
            "minutes": round(self.elapsed() / 60, 2),
            "batch_size": self.budget.batch_size,
            "lr": self.budget.lr,
            "steps_this_run": trained,
        }
        print(f"[{self.stage}] done: {self.step} steps, {self.elapsed() / 60:.1f} min", file=sys.stderr)


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay; the fused CUDA kernel on a GPU."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0, fused=device.type == "cuda")


__all__ = ["StageLoop", "make_optimizer"]

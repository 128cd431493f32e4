"""One training run: where it writes (the loss log, the checkpoints, the record), its config, seed,
device and precision."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from sdlens.errors import ModelError
from sdlens.models.configs import TinyConfig

PRECISIONS = ("auto", "fp32", "bf16")


class Run:
    """One training run: output folder, config, seed, device, precision and the loss log."""

    def __init__(
        self,
        out: str | os.PathLike,
        cfg: TinyConfig,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        resume: bool = False,
        progress: bool = True,
        log_every: int = 50,
        checkpoint_minutes: float = 5.0,
        precision: str = "auto",
    ) -> None:
        if precision not in PRECISIONS:
            raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.out = Path(out)
        self.train_dir = self.out / "train"
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.resume = resume
        self.progress = progress
        self.log_every = log_every
        self.checkpoint_minutes = checkpoint_minutes
        # "auto": bf16 on CUDA, float32 on the CPU (bf16 pays on CPUs with AMX / AVX512-BF16 only)
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.stage_reports: dict[str, dict] = {}
        self.init_from: str | os.PathLike | None = None  # UNet/text weights to start from
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.train_dir.mkdir(parents=True, exist_ok=True)

    def autocast(self):
        """bf16 mixed precision when `self.bf16` (weights and optimiser stay float32), else float32."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def log(self, entry: dict) -> None:
        with open(self.train_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def checkpoint_path(self, stage: str) -> Path:
        return self.train_dir / "checkpoints" / f"{stage}.pt"


def write_record(run: Run, record: dict, *, init_from: str | os.PathLike | None = None) -> None:
    """Write ``OUT/training.json`` (``record``, with the history of the weights it started from and of
    the runs it continues) and ``OUT/train/config.json``."""
    if init_from is not None:  # the weights' history: the record of the run they were taken from
        source = Path(init_from) / "training.json"
        record["init_from"] = {
            "path": str(init_from),
            "training": json.loads(source.read_text()) if source.exists() else None,
        }
    previous = run.out / "training.json"
    if run.resume and previous.exists():  # keep the record of the runs this one continues
        earlier = json.loads(previous.read_text())
        record["earlier_runs"] = earlier.pop("earlier_runs", []) + [earlier]
    previous.write_text(json.dumps(record, indent=2) + "\n")
    (run.train_dir / "config.json").write_text(run.cfg.to_json() + "\n")


__all__ = ["PRECISIONS", "Run", "write_record"]

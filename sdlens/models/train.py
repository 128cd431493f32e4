"""Training the built-in model from scratch on the shapes world, stage by stage.

Stable Diffusion was trained in separate stages, and so is the tiny model:

1. text encoder (only for ``text_mode="clip"``): a tiny CLIP, trained contrastively on
   (image, caption) pairs of the shapes world, then frozen;
2. autoencoder (VAE): learns to squeeze 64x64x3 images into 16x16x4 latents and back;
3. denoiser (UNet): learns to predict the noise that was added to a latent, given the noisy
   latent, the timestep and the caption's text-encoder output; for ``text_mode="joint"`` the
   text encoder is trained together with it.

Every batch is drawn fresh from `sdlens.world.sample_batch`, on the training device, so there is
no dataset on disk and the model never sees the same image twice.

Read `train_tiny` (the whole run) and the three `train_*` functions (one stage each) top to
bottom; `StageLoop` holds the bookkeeping they share (budgets, learning-rate schedule,
progress bar, loss log, checkpoints), so that each loop shows only the learning.

What the run writes in ``out``::

    model_index.json unet/ vae/ text_encoder/ tokenizer/ scheduler/   a StableDiffusionPipeline, float16
    training.json                                                      config, budgets, steps, time, machine
    train/log.jsonl                                                    the loss log, one JSON line per entry
    train/checkpoints/<stage>.pt                                       for --resume
    train/vae/, train/text_encoder/                                    the float32 stage results

Only the first two lines belong in a shipped model folder (``sdlens/data/tiny``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlens.errors import ModelError
from sdlens.models.configs import (
    TinyConfig,
    build_sampler,
    build_text_encoder,
    build_train_scheduler,
    build_unet,
    build_vae,
)

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


# ---------------------------------------------------------------------------------------------
# The run: where it writes, on which device, and the shared helpers.


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

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"params": self.params}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        for e, saved in zip(self.params, state["params"]):
            e.copy_(saved)


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


# ---------------------------------------------------------------------------------------------
# Stage 1 (text_mode="clip" only): a tiny CLIP on the shapes world.


class TinyImageEncoder(nn.Module):
    """The image half of the tiny CLIP: four strided convolutions, a global average, a projection.

    Used only to pretrain the text encoder; it is not part of the pipeline.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.convs = nn.Sequential(*layers)  # (N, 3, 64, 64) -> (N, 128, 4, 4)
        self.proj = nn.Linear(chans[-1], width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images).mean(dim=(2, 3)))  # (N, width)


def train_clip(run: Run, budget: Budget, tokens: CaptionTokens) -> nn.Module:
    """Contrastive pretraining of the text encoder, as CLIP: matching (image, caption) pairs score high.

    Each batch holds N images and their N captions. Both are embedded and L2-normalised; the
    N x N matrix of cosine similarities, times a learned temperature, is read as logits, and
    each image should pick its own caption (and each caption its image). The world has few
    distinct captions, so a batch often holds the same caption twice: the targets spread
    evenly over all pairs with the same caption. The text side is CLIP's: the end token's slot
    (`pooler_output`), through a linear projection.
    """
    cfg, device = run.cfg, run.device
    text_encoder = build_text_encoder(cfg).to(device).train()
    image_encoder = TinyImageEncoder(cfg.text_width).to(device).train()
    text_proj = nn.Linear(cfg.text_width, cfg.text_width, bias=False).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
    heads = nn.ParameterDict({"logit_scale": logit_scale})
    modules = {
        "text_encoder": text_encoder,
        "image_encoder": image_encoder,
        "text_proj": text_proj,
        "heads": heads,
    }
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = make_optimizer(params, budget.lr, device)

    distinct: dict[str, int] = {}  # caption -> a number, to compare captions on the device
    loop = StageLoop(run, "clip", budget, modules, optimizer)
    while loop.running():
        loop.set_lr()
        images, captions = sample(run, budget, loop.generator)  # (N, 3, H, W), N strings
        ids = tokens(captions).to(device, non_blocking=True)  # (N, 77)
        caption_id = torch.tensor(
            [distinct.setdefault(c, len(distinct)) for c in captions], device=device
        )  # (N,)
        same = (caption_id[:, None] == caption_id[None, :]).float()  # (N, N): 1 where the captions are equal
        targets = same / same.sum(dim=1, keepdim=True)  # (N, N), rows sum to 1; symmetric

        with run.autocast():
            image_features = F.normalize(image_encoder(images).float(), dim=-1)  # (N, width)
            pooled = text_encoder(input_ids=ids).pooler_output  # (N, width): the end token's slot
            text_features = F.normalize(text_proj(pooled).float(), dim=-1)  # (N, width)
        logits = logit_scale.clamp(max=math.log(100)).exp() * image_features @ text_features.T  # (N, N)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loop.end_step(loss)
    loop.close()

    text_encoder.eval().requires_grad_(False)
    text_encoder.save_pretrained(run.train_dir / "text_encoder")
    return text_encoder


# ---------------------------------------------------------------------------------------------
# Stage 2: the autoencoder.


def train_vae(run: Run, budget: Budget) -> nn.Module:
    """The VAE: encode an image to a distribution over latents, sample one, decode it back.

    Loss = reconstruction (L1 + MSE, in [-1, 1] pixel units) + a tiny KL term towards N(0, 1),
    1e-6 per latent value (SD's autoencoder also weights its KL by 1e-6: it keeps the latents'
    scale tame, it is no real prior). SD adds a perceptual and an adversarial loss for photos;
    flat-coloured shapes do not need them.

    After training, `scaling_factor` (SD 1.x: 0.18215) is set to 1 / std of the latents, so that
    the UNet sees latents of unit variance, the scale its noise schedule assumes.
    """
    cfg, device = run.cfg, run.device
    vae = build_vae(cfg).to(device).train()
    optimizer = make_optimizer(vae.parameters(), budget.lr, device)

    loop = StageLoop(run, "vae", budget, {"vae": vae}, optimizer)
    while loop.running():
        loop.set_lr()
        images, _ = sample(run, budget, loop.generator)  # (N, 3, 64, 64) in [-1, 1]

        with run.autocast():
            posterior = vae.encode(images).latent_dist  # a diagonal Gaussian over (N, 4, 16, 16)
            latents = posterior.sample(generator=loop.generator)  # (N, 4, 16, 16)
            reconstruction = vae.decode(latents).sample  # (N, 3, 64, 64)
        reconstruction = reconstruction.float()
        recon_loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        kl = posterior.kl().float().mean() / latents[0].numel()  # per latent value
        loss = recon_loss + cfg.vae_kl_weight * kl

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        loop.end_step(loss)
    loop.close()

    vae.eval().requires_grad_(False)
    saved = run.train_dir / "vae" / "config.json"
    if loop.step == loop.steps_at_start and saved.exists():  # resumed a finished stage: keep its factor
        scaling_factor = json.loads(saved.read_text())["scaling_factor"]
    else:
        scaling_factor = latent_scaling_factor(run, vae, n=min(1024, max(64, 4 * budget.batch_size)))
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(run.train_dir / "vae")
    return vae


@torch.no_grad()
def latent_scaling_factor(run: Run, vae: nn.Module, n: int) -> float:
    """1 / standard deviation of the VAE's latents over n fresh images (seeded apart from training)."""
    from sdlens.world import sample_batch

    generator = torch.Generator(run.device).manual_seed(run.seed + 123_457)
    images, *_ = sample_batch(n, generator=generator, size=run.cfg.image_size, device=run.device)
    latents = torch.cat(
        [vae.encode(chunk).latent_dist.sample(generator=generator) for chunk in images.split(256)]
    )
    return float(1.0 / latents.float().std())


def init_from_export(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module) -> None:
    """Load the UNet's and text encoder's weights from a pipeline folder that train-tiny wrote."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    src = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch.float32, local_files_only=True)
    unet.load_state_dict(src.state_dict())
    te = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=torch.float32, local_files_only=True)
    text_encoder.load_state_dict(te.state_dict())
    fill_new_words(text_encoder)


def fill_new_words(text_encoder: nn.Module, seed: int = 0) -> list[int]:
    """Give the world's words whose token-embedding rows are all zero a random row; returns their token ids.

    An export zeroes the rows no world caption used (``export_pipeline``), so a word the world gained
    since ("small", "big") would read as its position alone, like any unknown word. It gets a random
    row of the same norm as the world's other rows (seeded, so a run repeats), as a frozen text
    encoder's untrained rows are: the UNet then learns to read it.
    """
    from sdlens.tokens import load_clip_tokenizer

    table = text_encoder.get_input_embeddings().weight  # (49408, width)
    tokenizer = load_clip_tokenizer()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = [i for i in world_token_ids(tokenizer) if i not in special]
    empty = [i for i in ids if not table[i].detach().any()]
    if empty:
        used = [i for i in ids if i not in empty]
        norm = table[used].detach().norm(dim=-1).mean() if used else torch.tensor(1.0)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randn(len(empty), table.shape[1], generator=g)
        with torch.no_grad():
            table[empty] = (rows / rows.norm(dim=-1, keepdim=True) * norm).to(table)
        print(f"[unet] new world words get random token rows: {tokenizer.convert_ids_to_tokens(empty)}",
              file=sys.stderr)
    return empty


def find_vae(path: str | os.PathLike) -> Path:
    """The AutoencoderKL folder in `path`: a train-tiny output (its train/vae or vae) or the VAE folder itself."""
    path = Path(path)
    for candidate in (path / "train" / "vae", path / "vae", path):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"no trained VAE in {path}: expected {path}/train/vae, {path}/vae or {path} itself to hold an "
        f"AutoencoderKL (config.json + weights), as `sdlens train-tiny --stages vae --out {path}` writes"
    )


def load_vae(run: Run, path: str | os.PathLike) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = find_vae(path)
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).float()
    expected = build_vae(run.cfg).config
    for key in ("block_out_channels", "latent_channels", "sample_size"):
        if tuple(_as_tuple(vae.config[key])) != tuple(_as_tuple(expected[key])):
            raise ModelError(
                f"the VAE in {folder} has {key}={vae.config[key]}, this config needs {expected[key]}"
            )
    print(f"[vae] using the trained VAE in {folder}", file=sys.stderr)
    return vae.to(run.device).eval().requires_grad_(False)


def _as_tuple(x):
    return x if isinstance(x, (list, tuple)) else (x,)


# ---------------------------------------------------------------------------------------------
# Stage 3: the denoiser.


def train_unet(
    run: Run, budget: Budget, vae: nn.Module, text_encoder: nn.Module, tokens: CaptionTokens
) -> tuple[nn.Module, nn.Module]:
    """The UNet learns to predict the noise in a noisy latent, given the timestep and the caption.

    One step, as in Stable Diffusion's training:
      1. draw images and captions; replace `caption_dropout` (10%) of the captions by "" so that
         the model also learns the unconditional prediction that classifier-free guidance needs;
      2. encode the images to latents with the frozen VAE (times its scaling factor);
      3. draw a timestep t per image and Gaussian noise; mix them by the DDPM schedule:
         noisy = sqrt(alpha_bar_t) * latent + sqrt(1 - alpha_bar_t) * noise;
      4. the text encoder turns the captions into (N, 77, width) slot vectors; with `word_dropout`
         or `tail_dropout`, some slots are zeroed (a zero key and value: the slot tells the UNet
         nothing); the UNet reads them through cross-attention and predicts the noise;
      5. loss: mean squared error between predicted and true noise, each image weighted by
         min(SNR_t, gamma) / SNR_t ("min-SNR": the nearly clean timesteps, which are easy and
         would otherwise dominate the gradient, count less). Nothing looks at attention maps.

    For ``text_mode="joint"`` the text encoder's weights are in the optimiser with the UNet's;
    otherwise it is frozen. Returns the exponential moving averages of both, which are exported.
    """
    cfg, device = run.cfg, run.device
    unet = build_unet(cfg).to(device).train()
    if run.init_from is not None:  # continue from an exported run's weights (a fresh optimiser)
        init_from_export(run.init_from, unet, text_encoder)
    joint = cfg.text_mode == "joint"
    text_encoder.train(joint).requires_grad_(joint)
    noise_schedule = build_train_scheduler(cfg)
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)  # (T,)
    empty_ids = tokens([""]).to(device)  # (1, 77): start, end, padding

    modules = {"unet": unet, "text_encoder": text_encoder}  # both go into the checkpoint
    emas = {"unet": EMA(unet)}
    params = list(unet.parameters())
    if joint:
        emas["text_encoder"] = EMA(text_encoder)
        params += list(text_encoder.parameters())
    optimizer = make_optimizer(params, budget.lr, device)

    loop = StageLoop(run, "unet", budget, modules, optimizer, emas)
    while loop.running():
        loop.set_lr()
        g = loop.generator
        images, captions = sample(run, budget, g)  # (N, 3, 64, 64), N strings
        n = images.shape[0]
        ids = tokens(captions).to(device, non_blocking=True)  # (N, 77)
        drop = torch.rand(n, generator=g, device=device) < cfg.caption_dropout  # (N,)
        ids = torch.where(drop[:, None], empty_ids, ids)  # the dropped captions become ""

        with torch.no_grad(), run.autocast():
            latents = vae.encode(images).latent_dist.sample(generator=g)  # (N, 4, 16, 16)
        latents = latents.float() * vae.config.scaling_factor

        t = torch.randint(0, cfg.num_train_timesteps, (n,), generator=g, device=device)  # (N,)
        noise = torch.randn(latents.shape, generator=g, device=device)  # (N, 4, 16, 16)
        alpha_bar = alphas_cumprod[t][:, None, None, None]  # (N, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # (N, 4, 16, 16)

        with run.autocast():
            with nullcontext() if joint else torch.no_grad():
                text = text_encoder(input_ids=ids).last_hidden_state  # (N, 77, width)
            if cfg.word_dropout > 0 or cfg.tail_dropout > 0:
                dropped = word_slot_dropout(ids, tokens.tokenizer, cfg.word_dropout, g)  # (N, 77)
                dropped |= tail_slot_dropout(ids, tokens.tokenizer, cfg.tail_dropout, g)
                text = text.masked_fill(dropped[..., None], 0.0)
            predicted = unet(noisy, t, encoder_hidden_states=text).sample  # (N, 4, 16, 16)
        per_image = F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (N,)
        if cfg.snr_gamma is not None:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])  # (N,)
            per_image = per_image * snr.clamp(max=cfg.snr_gamma) / snr
        loss = per_image.mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for name, ema in emas.items():
            ema.update(modules[name], loop.step)
        loop.end_step(loss)
    loop.close()

    # the exported weights are the moving averages
    unet_ema = copy.deepcopy(unet).eval().requires_grad_(False)
    emas["unet"].copy_to(unet_ema)
    text_ema = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    if joint:
        emas["text_encoder"].copy_to(text_ema)
    return unet_ema, text_ema


def word_slots(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Bool (N, 77): which slots of `ids` hold a word's token (not start, end or padding)."""
    special = torch.tensor(
        sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}), device=ids.device
    )
    return ~torch.isin(ids, special)


def word_slot_dropout(ids: torch.Tensor, tokenizer, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which slots to zero: each word slot of `ids` (N, 77) with chance `p`; never a start, end or
    padding slot. Returns a bool (N, 77) on the ids' device."""
    return word_slots(ids, tokenizer) & (torch.rand(ids.shape, generator=generator, device=ids.device) < p)


def tail_slot_dropout(ids: torch.Tensor, tokenizer, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which slots to zero: for each caption of `ids` (N, 77) with chance `p`, every slot after one
    of its word slots drawn uniformly (the end and padding slots too); captions without words
    ("") are left whole. Returns a bool (N, 77) on the ids' device."""
    n_words = word_slots(ids, tokenizer).sum(1)  # (N,): words sit in slots 1..n_words
    u = torch.rand(ids.shape[0], generator=generator, device=ids.device)
    cut = (u * n_words).long() + 1  # (N,): the last slot kept, a word slot drawn uniformly
    hit = (torch.rand(ids.shape[0], generator=generator, device=ids.device) < p) & (n_words > 0)
    position = torch.arange(ids.shape[1], device=ids.device)  # (77,)
    return hit[:, None] & (position[None, :] > cut[:, None])


# ---------------------------------------------------------------------------------------------
# Export: a StableDiffusionPipeline folder in float16.


def world_token_ids(tokenizer) -> list[int]:
    """The token ids the shapes world's captions use, plus the start and end (= padding) tokens."""
    from sdlens.world import VOCAB_WORDS

    ids = tokenizer(
        " ".join(VOCAB_WORDS), padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    return sorted(set(ids))


def export_pipeline(
    out: Path,
    cfg: TinyConfig,
    vae: nn.Module,
    text_encoder: nn.Module,
    unet: nn.Module,
    tokenizer,
    *,
    zero_unused_tokens: bool = True,
) -> None:
    """Write a StableDiffusionPipeline folder with float16 safetensors weights.

    With `zero_unused_tokens`, the rows of the token-embedding table that no world caption uses
    are set to zero. Those rows were never trained (random or untouched), so the model means the
    same on world captions; an unknown word then becomes its position alone, and zeros compress
    (a 49408 x 64 table is 6.3 MB in float16 and most of the model's size).
    """
    from diffusers import StableDiffusionPipeline

    vae16 = copy.deepcopy(vae).cpu().half()
    unet16 = copy.deepcopy(unet).cpu().half()
    text16 = copy.deepcopy(text_encoder).cpu().half()
    if zero_unused_tokens:
        table = text16.get_input_embeddings().weight  # (49408, width)
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[world_token_ids(tokenizer)] = True
        with torch.no_grad():
            table[~keep] = 0
    pipe = StableDiffusionPipeline(
        vae=vae16,
        text_encoder=text16,
        tokenizer=tokenizer,
        unet=unet16,
        scheduler=build_sampler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)  # no stale files from an earlier export
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer")
    _prefix_text_encoder_keys(out / "text_encoder" / "model.safetensors")


def write_clip_tokenizer(folder: Path, model_max_length: int | None = None) -> None:
    """Replace ``folder`` by the tokenizer as CLIP ships it (vocab.json + merges.txt, 1.6 MB) rather than
    the 3.6 MB tokenizer.json that transformers writes: the same tokenizer, loaded the same way;
    ``model_max_length`` sets its number of slots (default CLIP's 77)."""
    from sdlens.tokens import CLIP_TOKENIZER_DIR

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(CLIP_TOKENIZER_DIR, folder, ignore=shutil.ignore_patterns("__*", "*.py"))
    if model_max_length is not None:
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_max_length"] = model_max_length
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _prefix_text_encoder_keys(path: Path) -> None:
    """Store the text encoder's weights under CLIP's usual names ("text_model.embeddings...").

    transformers 5 saves CLIPTextModel without the "text_model." prefix; transformers 4 needs it,
    and 5 reads both (as it reads SD's checkpoints), so the prefixed names load everywhere.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    if not all(k.startswith("text_model.") for k in weights):
        weights = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}
        save_file(weights, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# The whole run.


def train_tiny(
    out: str | os.PathLike,
    cfg: TinyConfig | None = None,
    *,
    budgets: dict[str, Budget] | None = None,
    stages: tuple[str, ...] | None = None,
    vae_from: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    checkpoint_minutes: float = 5.0,
    zero_unused_tokens: bool = True,
    command: list[str] | None = None,
    init_from: str | os.PathLike | None = None,
    precision: str = "auto",
) -> Path:
    """Train the tiny model and write its pipeline folder to `out`. Returns `out`.

    stages:   which stages to train; default: "clip" (only for text_mode="clip"), "vae" (unless
              `vae_from` is given) and "unet". ``("vae",)`` trains only a VAE, to share with
              several UNet runs through `vae_from`.
    budgets:  per stage, a `Budget` (steps and/or minutes, batch size, learning rate); stages
              not given use DEFAULT_BUDGETS.
    resume:   continue from the checkpoints in `out` (each stage goes on to its budget).
    precision: "auto" (bf16 autocast on CUDA, float32 on the CPU), "fp32" or "bf16" (also on
              the CPU, where AMX makes a UNet step about 1.3x faster).
    """
    from sdlens.tokens import load_clip_tokenizer

    cfg = cfg or TinyConfig()
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
    if stages is None:
        stages = tuple(
            s for s in STAGES if (s != "clip" or cfg.text_mode == "clip") and (s != "vae" or not vae_from)
        )
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ModelError(f"unknown stages {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    if "vae" in stages and vae_from:
        raise ModelError("give either the 'vae' stage or vae_from, not both")
    if (
        "unet" in stages
        and "vae" not in stages
        and not vae_from
        and not (resume and (Path(out) / "train/vae").exists())
    ):
        raise ModelError(
            "the UNet stage needs a VAE: add the 'vae' stage, or pass vae_from=DIR (--vae-from DIR)"
        )
    out = Path(out)
    if not resume and (out / "train" / "checkpoints").exists():
        raise FileExistsError(
            f"{out} already holds a training run: pass --resume to continue it, or choose another --out"
        )

    torch.manual_seed(seed)
    run = Run(
        out,
        cfg,
        seed=seed,
        device=device,
        resume=resume,
        progress=progress,
        log_every=log_every,
        checkpoint_minutes=checkpoint_minutes,
        precision=precision,
    )
    run.init_from = init_from
    started = time.monotonic()
    print(
        f"training the tiny model on {run.device} into {out} (stages: {', '.join(stages)})", file=sys.stderr
    )
    tokenizer = load_clip_tokenizer()
    tokens = CaptionTokens(tokenizer)

    # stage 1: the text encoder
    if "clip" in stages:
        text_encoder = train_clip(run, budgets["clip"], tokens)
    elif cfg.text_mode == "clip":
        text_encoder = load_text_encoder(run, out / "train" / "text_encoder")
    else:
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(cfg).to(
            run.device
        )  # random init: trained jointly, or frozen as it is

    # stage 2: the autoencoder
    if "vae" in stages:
        vae = train_vae(run, budgets["vae"])
    elif "unet" in stages:
        vae = load_vae(run, vae_from or out)

    # stage 3: the denoiser, then the pipeline folder
    if "unet" in stages:
        unet, text_encoder = train_unet(run, budgets["unet"], vae, text_encoder, tokens)
        export_pipeline(out, cfg, vae, text_encoder, unet, tokenizer, zero_unused_tokens=zero_unused_tokens)

    record = {
        "command": command,
        "config": cfg.to_dict(),
        "seed": seed,
        "stages": run.stage_reports,
        "budgets": {s: vars(budgets[s]) for s in stages},
        "vae_from": str(vae_from) if vae_from else None,
        "device": _describe_device(run.device),
        "precision": "bf16" if run.bf16 else "fp32",  # what the autocast ran, whatever was asked
        "wall_minutes": round((time.monotonic() - started) / 60, 2),
        "versions": _versions(),
    }
    write_record(run, record, init_from=init_from)
    return out


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


def load_text_encoder(run: Run, folder: Path) -> nn.Module:
    from transformers import CLIPTextModel

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no pretrained text encoder in {folder}: run the 'clip' stage first")
    return CLIPTextModel.from_pretrained(folder).float().to(run.device).eval()


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }

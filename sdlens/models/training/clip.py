"""Stage 1 (``text_mode="clip"`` only): a tiny CLIP on the shapes world, whose text encoder the UNet reads."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlens.models.configs import build_text_encoder

from .budget import Budget
from .data import CaptionTokens, sample
from .loop import StageLoop, make_optimizer
from .run import Run


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


def load_text_encoder(run: Run, folder: Path) -> nn.Module:
    from transformers import CLIPTextModel

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no pretrained text encoder in {folder}: run the 'clip' stage first")
    return CLIPTextModel.from_pretrained(folder).float().to(run.device).eval()


__all__ = ["TinyImageEncoder", "load_text_encoder", "train_clip"]

"""Export: the trained stages as a StableDiffusionPipeline folder in float16."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from sdlens.models.configs import TinyConfig, build_sampler

from .data import world_token_ids


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
    prefix_text_encoder_keys(out / "text_encoder" / "model.safetensors")


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


def prefix_text_encoder_keys(path: Path) -> None:
    """Store the text encoder's weights under CLIP's usual names ("text_model.embeddings...").

    transformers 5 saves CLIPTextModel without the "text_model." prefix; transformers 4 needs it,
    and 5 reads both (as it reads SD's checkpoints), so the prefixed names load everywhere.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    if not all(k.startswith("text_model.") for k in weights):
        weights = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}
        save_file(weights, path, metadata={"format": "pt"})


__all__ = ["export_pipeline", "prefix_text_encoder_keys", "write_clip_tokenizer"]

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

Read `tiny.train_tiny` (the whole run) and the three stages, one module each, top to bottom:
`clip.train_clip`, `vae.train_vae`, `unet.train_unet`. `loop.StageLoop` holds the bookkeeping they
share (budgets, learning-rate schedule, progress bar, loss log, checkpoints), so that each loop
shows only the learning. The rest: `budget` (how long a stage trains), `run` (where a run writes),
`data` (the world's batches and their token ids), `ema` (the weights' moving average), `export`
(the pipeline folder) and `machine` (the device and versions a record names).

What the run writes in ``out``::

    model_index.json unet/ vae/ text_encoder/ tokenizer/ scheduler/   a StableDiffusionPipeline, float16
    training.json                                                      config, budgets, steps, time, machine
    train/log.jsonl                                                    the loss log, one JSON line per entry
    train/checkpoints/<stage>.pt                                       for --resume
    train/vae/, train/text_encoder/                                    the float32 stage results

Only the first two lines belong in a shipped model folder (``sdlens/data/tiny``).
"""

from .budget import DEFAULT_BUDGETS, STAGE_SEEDS, STAGES, Budget
from .clip import TinyImageEncoder, load_text_encoder, train_clip
from .data import CaptionTokens, sample, world_token_ids
from .ema import EMA
from .export import export_pipeline, prefix_text_encoder_keys, write_clip_tokenizer
from .loop import StageLoop, make_optimizer
from .machine import describe_device, versions
from .run import PRECISIONS, Run, write_record
from .tiny import check_stages, train_tiny
from .unet import (
    fill_new_words,
    init_from_export,
    tail_slot_dropout,
    train_unet,
    word_slot_dropout,
    word_slots,
)
from .vae import find_vae, latent_scaling_factor, load_vae, train_vae

__all__ = [
    "DEFAULT_BUDGETS",
    "EMA",
    "PRECISIONS",
    "STAGES",
    "STAGE_SEEDS",
    "Budget",
    "CaptionTokens",
    "Run",
    "StageLoop",
    "TinyImageEncoder",
    "check_stages",
    "describe_device",
    "export_pipeline",
    "fill_new_words",
    "find_vae",
    "init_from_export",
    "latent_scaling_factor",
    "load_text_encoder",
    "load_vae",
    "make_optimizer",
    "prefix_text_encoder_keys",
    "sample",
    "tail_slot_dropout",
    "train_clip",
    "train_tiny",
    "train_unet",
    "train_vae",
    "versions",
    "word_slot_dropout",
    "word_slots",
    "world_token_ids",
    "write_clip_tokenizer",
    "write_record",
]

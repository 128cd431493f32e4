"""The built-in model's architecture: a small model of exactly Stable Diffusion's family.

Stable Diffusion is four parts, and so is the tiny model. Each is the same diffusers or
transformers class that SD uses, only smaller:

    part            class                          SD 1.5                      tiny (default)
    autoencoder     diffusers AutoencoderKL        512 px -> 64x64x4 (x8)      64 px -> 16x16x4 (x4)
    denoiser        diffusers UNet2DConditionModel (320, 640, 1280, 1280)      (64, 128, 128)
    text encoder    transformers CLIPTextModel     768 wide x 12 layers        64 wide x 0-3 layers
    scheduler       diffusers schedulers           PNDM / DDIM, 50 steps       DPM-Solver++ (2M), 25 steps

The UNet has cross-attention transformer blocks at the 16x16 and 8x8 latent levels only (the
4x4 level and the middle block are plain ResNet blocks), so every cross-attention map is
16x16 or 8x8. With `layers_per_block=2`, as in SD, that is 2 + 2 transformer blocks on the
way down and 3 + 3 on the way up: 10 cross-attention layers.

`TinyConfig` holds the knobs that the variants of the built-in model differ by; `vae_config`,
`unet_config`, `text_config` and the scheduler functions turn it into the configs the library
classes take. Everything here is plain data: building a model from it downloads nothing.

>>> cfg = TinyConfig()
>>> unet_config(cfg)["block_out_channels"]
(64, 128, 128)
>>> cross_attention_sizes(cfg)
[16, 16, 8, 8, 8, 8, 8, 16, 16, 16]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

# CLIP's tokenizer (shipped in sdlens/data/clip_tokenizer): the model keeps its vocabulary and slots.
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
CLIP_BOS_ID = 49406  # <|startoftext|>
CLIP_EOS_ID = 49407  # <|endoftext|>, also used for padding as in SD 1.x

# How the text encoder is obtained (TinyConfig.text_mode).
TEXT_MODES = {
    "joint": "trained from scratch together with the UNet (one optimiser for both)",
    "frozen": "random initialisation, frozen: the UNet must learn to read fixed, untrained token vectors",
    "clip": "pretrained first as a tiny CLIP on the shapes world (contrastive, with a small image encoder), then frozen",
}


class ImageConfig:
    """What both built-in models' configs share (a dataclass with ``image_size`` and ``vae_channels``):
    the latent's geometry and plain-dict round trips."""

    @property
    def latent_factor(self) -> int:
        """How many image pixels one latent pixel covers along each axis (4 for 3 VAE levels)."""
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class TinyConfig(ImageConfig):
    """Every knob of the tiny model and its training. The defaults are the shipped variant's.

    Text encoder (`text_*`): its width sets the size of the token-embedding table, 49408 rows
    (CLIP's vocabulary) x width, the biggest single tensor of the model; 64 keeps it at 6.3 MB
    in float16. `text_layers=0` is allowed: the encoder is then token embedding + position
    embedding + the final LayerNorm, so every slot holds its own token and nothing else.
    """

    # --- images and autoencoder ---
    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 2 downsamplings, 64 px -> 16x16 latents
    vae_layers_per_block: int = 1
    vae_kl_weight: float = 1e-6  # as SD's autoencoder: the KL term only keeps the latents tame

    # --- denoiser ---
    unet_channels: tuple[int, ...] = (64, 128, 128)  # at 16x16, 8x8, 4x4 latent pixels
    unet_layers_per_block: int = 2
    unet_head_dim: int = 32  # channels per attention head: 64 channels -> 2 heads, 128 -> 4 heads
    unet_transformer_layers: int = 1  # transformer blocks per attention module, as SD 1.x

    # --- text encoder ---
    text_mode: str = "joint"  # one of TEXT_MODES
    text_width: int = 64
    text_layers: int = 1  # one causal layer localised best in the GPU comparison (notes/tiny_model.md)
    text_heads: int = 2
    text_mlp_ratio: int = 4

    # --- training noise schedule (SD 1.x's) and sampler ---
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"

    # --- training ---
    caption_dropout: float = 0.1  # share of captions replaced by "" so that classifier-free guidance works
    two_object_prob: float = 0.5
    # the caption kinds (sdlens.world.sample_scene): scenes whose caption gives no positions (the
    # objects are placed anywhere), and each object's chance of a size word ("small" / "big")
    free_position_prob: float = 0.0
    size_word_prob: float = 0.0
    # each word slot's chance of being zeroed in the UNet's input during training: a causal text
    # encoder lets a noun's slot carry its adjectives too, and then the adjective's own slot (the
    # colour word's map) need not point at the object; with a word's slot sometimes missing, the
    # others must each carry what they name. Start, end and padding slots are never dropped.
    word_dropout: float = 0.0
    # each caption's chance that every slot after one of its words (drawn uniformly) is zeroed,
    # end and padding slots included: the UNet then has only the slots up to that word, so a colour
    # word cut off from its noun must itself say where the colour goes (and the causal encoder has
    # no later slot to move it into)
    tail_dropout: float = 0.0
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); None: plain MSE

    def __post_init__(self) -> None:
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        if self.text_mode not in TEXT_MODES:
            raise ModelError(f"text_mode must be one of {sorted(TEXT_MODES)}, got {self.text_mode!r}")
        if len(self.unet_channels) != 3:
            raise ModelError(f"unet_channels needs 3 levels (16x16, 8x8, 4x4), got {self.unet_channels}")
        for c in self.unet_channels[:2]:
            if c % self.unet_head_dim:
                raise ModelError(f"unet_head_dim {self.unet_head_dim} does not divide the channels {c}")
        if self.text_width % self.text_heads:
            raise ModelError(f"text_heads {self.text_heads} does not divide text_width {self.text_width}")
        if self.text_mode == "clip" and self.text_layers < 1:
            raise ModelError(
                "text_mode='clip' needs text_layers >= 1: a 0-layer encoder has nothing to pretrain"
            )
        if self.image_size % self.latent_factor:
            raise ModelError(f"image_size {self.image_size} is not a multiple of {self.latent_factor}")
        for name in ("two_object_prob", "free_position_prob", "size_word_prob", "word_dropout", "tail_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ModelError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


def vae_config(cfg: TinyConfig) -> dict[str, Any]:
    """AutoencoderKL kwargs: 64x64 RGB -> 16x16x4 latents. `scaling_factor` is set after training."""
    levels = len(cfg.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, min(cfg.vae_channels)),
        sample_size=cfg.image_size,
        scaling_factor=1.0,  # replaced by 1 / std(latents) once the VAE is trained, as SD's 0.18215
    )


def unet_config(cfg: TinyConfig) -> dict[str, Any]:
    """UNet2DConditionModel kwargs: cross-attention at the 16x16 and 8x8 levels, none at 4x4 or in the middle.

    diffusers' `attention_head_dim` argument is, for historical reasons, the *number of heads*
    (SD 1.5's config says 8 and means 8 heads of 40 channels); we compute it per level from
    `unet_head_dim`, the channels per head.
    """
    heads = tuple(max(1, c // cfg.unet_head_dim) for c in cfg.unet_channels)
    return dict(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2D",  # ResNet only: no 4x4 attention maps
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=heads,  # = number of heads per level, see the docstring
        transformer_layers_per_block=cfg.unet_transformer_layers,
        cross_attention_dim=cfg.text_width,
        norm_num_groups=32,
    )


def text_config(cfg: TinyConfig) -> dict[str, Any]:
    """CLIPTextConfig kwargs: CLIP's vocabulary and 77 positions, small width and depth.

    eos_token_id=49407 makes `pooler_output` the end token's slot, as in CLIP.
    """
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * cfg.text_mlp_ratio,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        projection_dim=cfg.text_width,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def noise_schedule_config(cfg: TinyConfig) -> dict[str, Any]:
    """The forward (noising) process, shared by the training scheduler and the sampler."""
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
    )


def build_vae(cfg: TinyConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(cfg))


def build_unet(cfg: TinyConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(cfg))


def build_text_encoder(cfg: TinyConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_config(cfg)))


def build_train_scheduler(cfg: TinyConfig):
    """DDPM: the training-time noise schedule (`add_noise`), SD's scaled-linear betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**noise_schedule_config(cfg))


def build_sampler(cfg: TinyConfig):
    """The pipeline's scheduler: DPM-Solver++ (2M), good at 20-25 steps; same betas as training."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        **noise_schedule_config(cfg),
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,  # unused with the default "linspace" spacing; 1 silences StableDiffusionPipeline's warning
    )


def cross_attention_sizes(cfg: TinyConfig) -> list[int]:
    """Side of each cross-attention layer's map, in the order the UNet runs them (down, up)."""
    s, lpb, n = cfg.latent_size, cfg.unet_layers_per_block, cfg.unet_transformer_layers
    down = [s] * lpb * n + [s // 2] * lpb * n
    up = [s // 2] * (lpb + 1) * n + [s] * (lpb + 1) * n
    return down + up

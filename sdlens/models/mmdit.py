"""The second built-in model, "tiny-sd3": Stable Diffusion 3's design, a pure transformer, trained with flow matching.

SD 1/2/XL denoise with a UNet that has transformer blocks inside it; SD 3 denoises with a
transformer alone. Its blocks (MMDiT) keep two streams, one of image tokens (2x2 patches of the
latent) and one of text tokens, each with its own weights, and join them in one attention over
both: image -> text is the cross-attention of a UNet, image -> image its self-attention, and the
text tokens read the image and each other too, in every block. Timestep and the pooled prompt
vector steer every block through adaptive LayerNorm (adaLN) instead of being added to pixels.

    part            class                                   SD 3 medium                 tiny-sd3
    autoencoder     AutoencoderKL                           16 latent channels          the tiny model's (frozen, 16x16x4)
    denoiser        SD3Transformer2DModel                   24 blocks x 1536 wide       8 blocks x 128 wide, patch 2: 64 image tokens
    text encoders   CLIPTextModelWithProjection x 2         CLIP-L (768) + CLIP-G (1280) 64 + 32 wide, 2 layers, 1 trained
                    T5EncoderModel (optional)               T5-XXL, 256 slots           none: the pipeline fills its 256 slots with zeros
    scheduler       FlowMatchEulerDiscreteScheduler         shift 3.0, 28 steps         shift 1.0, 28 steps

Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023), as SD 3 trains: a noisy
latent is a straight mix ``x_s = (1 - s) x_0 + s e`` of the clean latent and noise at noise level
``s`` in 0..1; the transformer predicts the velocity ``e - x_0`` along that straight path, and the
sampler walks the path back from noise with Euler steps. Noise levels are drawn logit-normal
(``s = sigmoid(n)``, n ~ N(0, 1)), SD 3's choice: the middle of the path, where the picture is
decided, is trained most.

The text encoders' embeddings and last layer are frozen at their random initialisation, as SD 3's
encoders are frozen at their pretraining. The pipeline takes the *penultimate* hidden state of each
CLIP (``hidden_states[-2]``). With `text_context_layers=0` that is the token and position
embedding: no slot has read any other word before the transformer, and whatever it learns of the
others it learns inside the joint attention. With `text_context_layers=1` one causal CLIP layer,
trained with the transformer, comes first: a slot has then read the words before it, as in SD 3's
CLIPs (and the UNet model's encoder), so "on the left" can carry "a red circle" to the pixels.

Training cost: without T5 the pipeline appends 256 zero slots (``max_sequence_length``) to the
32 CLIP slots. They are identical tokens and, as SD 3 adds no position to text tokens, stay
identical through every block, so training runs one of them whose attention logit counts 256
times (``RepeatedKeyJointProcessor``): the same function and the same gradients (tested), at a
third of the tokens. The exported model is plain diffusers and runs the 256 slots as they are.

>>> cfg = Sd3Config()
>>> transformer_config(cfg)["num_layers"], transformer_config(cfg)["joint_attention_dim"]
(8, 96)
>>> cfg.image_tokens
64
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdlens.models.configs import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, ImageConfig

from ..errors import ModelError


@dataclass
class Sd3Config(ImageConfig):
    """Every knob of tiny-sd3 and its training; the defaults are the shipped variant's."""

    # --- images and autoencoder (the tiny model's VAE, reused) ---
    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers_per_block: int = 1

    # --- the transformer ---
    patch_size: int = 2  # 16x16 latents -> 8x8 = 64 image tokens
    layers: int = 8
    heads: int = 4
    head_dim: int = 32  # width = heads x head_dim = 128
    pos_embed_max_size: int = 16  # sin-cos positions for up to 16x16 patches (128 px images)

    # --- text encoders (CLIP-L-like and CLIP-G-like) ---
    text_slots: int = 32  # the CLIP tokenizers' length (every world caption fits in 20)
    text_width: int = 64
    text_width_2: int = 32
    text_layers: int = 1
    text_heads: int = 2
    # std of the frozen token and position embeddings (CLIP initialises them at 0.02): the slots SD 3
    # reads are these embeddings (one layer, penultimate state), and at 0.02 the context embedder's
    # bias outweighs them, so every word slot looked like every other and like the empty T5 slots
    text_embedding_std: float = 1.0
    # causal CLIP layers between the embeddings and the penultimate state SD 3 reads, trained with the
    # transformer (they start as the identity, so weights trained without them load unchanged). With
    # none, each slot holds its own word and the words meet only inside the joint attention; with one,
    # a slot has read the words before it (as the UNet model's encoder does), so "left" can carry
    # "red circle" to the pixels that look it up
    text_context_layers: int = 0
    t5_slots: int = 256  # the zero slots the pipeline appends without T5 (its max_sequence_length default)

    # --- flow matching ---
    shift: float = 1.0  # the sampler's time shift; SD 3 uses 3.0 for 128x128 latents, 16x16 need none
    logit_mean: float = 0.0
    logit_std: float = 1.0

    # --- training data ---
    caption_dropout: float = 0.1
    # each caption's chance that its pooled vector (the adaLN input) is the empty prompt's while its
    # slots stay: the shipped weights, trained without it, read the prompt almost only through the
    # pooled vector (notes/tiny_model.md), so their word maps point nowhere; with it, the words must
    # reach the picture through the joint attention
    pooled_dropout: float = 0.0
    # False: the pooled vector reaches nothing (its projection's input weights are zero and frozen, in
    # training and in the exported weights), so the prompt can only be read through the joint
    # attention; the classes and the pipeline are SD 3's unchanged. With it (SD 3's design) the model
    # took the pooled summary and left the words unread (notes/tiny_model.md, run 1)
    pooled_input: bool = False
    # each colour word's chance that its slot reaches the transformer as the zero slot (what the empty
    # T5 slots are), after the text encoder: the pixels must then find the colour where a causal
    # context layer also put it, the noun's slot, so the noun's map is pushed onto its object as the
    # UNet model's is. Without it the pixels read the colour from the colour word's own slot and the
    # noun's map peaks on the background (notes/tiny_model.md). The noun's and later slots stay whole
    color_word_dropout: float = 0.0
    two_object_prob: float = 0.7
    free_position_prob: float = 0.35
    size_word_prob: float = 0.35

    def __post_init__(self) -> None:
        self.vae_channels = tuple(self.vae_channels)
        for name in ("layers", "heads", "head_dim", "text_slots", "text_width", "text_width_2", "t5_slots"):
            if getattr(self, name) < 1:
                raise ModelError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.text_context_layers < 0:
            raise ModelError(f"text_context_layers must be 0 or more, got {self.text_context_layers}")
        if not self.text_embedding_std > 0:
            raise ModelError(f"text_embedding_std must be positive, got {self.text_embedding_std}")
        if self.text_slots > 77:
            raise ModelError(f"text_slots must be at most CLIP's 77, got {self.text_slots}")
        if self.latent_size % self.patch_size:
            raise ModelError(f"patch_size {self.patch_size} does not divide the latent size {self.latent_size}")
        for name in ("caption_dropout", "pooled_dropout", "color_word_dropout", "two_object_prob", "free_position_prob", "size_word_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ModelError(f"{name} must be between 0 and 1, got {getattr(self, name)}")

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


def transformer_config(cfg: Sd3Config) -> dict[str, Any]:
    """SD3Transformer2DModel kwargs. The text stream's input is the two CLIPs' slots side by side (96)."""
    joint = cfg.text_width + cfg.text_width_2
    return dict(
        sample_size=cfg.latent_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=joint,
        caption_projection_dim=cfg.width,
        pooled_projection_dim=joint,  # the two pooled (projected) vectors side by side
        pos_embed_max_size=cfg.pos_embed_max_size,
    )


def clip_config(cfg: Sd3Config, width: int) -> dict[str, Any]:
    """CLIPTextConfig kwargs for one of the two encoders; its projection keeps the width."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=cfg.text_slots,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=cfg.text_context_layers + cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        projection_dim=width,
        hidden_act="quick_gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def build_transformer(cfg: Sd3Config):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**transformer_config(cfg))


def build_text_encoders(cfg: Sd3Config, seed: int = 0):
    """The two CLIP text encoders with projection, seeded.

    The embeddings and the last `text_layers` layers are frozen, so the seed fixes them for good: they
    are drawn exactly as without context layers, whatever `text_context_layers` is. The
    `text_context_layers` layers in front of them start as the identity (their attention output and
    second MLP projection are zero) and are the encoders' only trainable parameters.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    frozen_cfg = replace(cfg, text_context_layers=0)
    encoders = []
    for width in (cfg.text_width, cfg.text_width_2):
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config(frozen_cfg, width)))
        embeddings = encoder.text_model.embeddings
        with torch.no_grad():
            for table in (embeddings.token_embedding.weight, embeddings.position_embedding.weight):
                table.normal_(0.0, cfg.text_embedding_std)
        encoder.eval().requires_grad_(False)
        if cfg.text_context_layers:
            encoder = with_context_layers(encoder, CLIPTextConfig(**clip_config(cfg, width)), cfg.text_context_layers)
        encoders.append(encoder)
    return tuple(encoders)


def with_context_layers(encoder, config, n: int):
    """`encoder` (frozen) with `n` trainable identity layers put in front of its layers.

    Returns a new CLIPTextModelWithProjection of `config` (n more layers) holding `encoder`'s weights
    in its last layers. The new layers have CLIP's initialisation except that each residual branch
    ends in zeros (attention output and second MLP projection), so a layer's output is its input
    until training moves them.
    """
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng():  # seeded apart from the frozen parts' draws, which must not move
        torch.manual_seed(0)
        out = CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    state = {k: v for k, v in out.state_dict().items() if k.startswith("text_model.encoder.layers.")}
    for key, value in encoder.state_dict().items():  # the frozen layer i becomes layer n + i
        parts = key.split(".")
        if parts[:3] == ["text_model", "encoder", "layers"]:
            parts[3] = str(int(parts[3]) + n)
        state[".".join(parts)] = value
    out.load_state_dict(state)
    for layer in out.text_model.encoder.layers[:n]:
        with torch.no_grad():
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        layer.requires_grad_(True)
    return out


def build_sampler(cfg: Sd3Config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_tokenizer(cfg: Sd3Config):
    """CLIP's tokenizer with `text_slots` slots."""
    from sdlens.tokens import load_clip_tokenizer

    tokenizer = copy.deepcopy(load_clip_tokenizer())
    tokenizer.model_max_length = cfg.text_slots
    return tokenizer


def build_pipeline(cfg: Sd3Config, transformer, vae, text_encoders, *, seed: int = 0):
    """A StableDiffusion3Pipeline of these parts (no T5), on the parts' device."""
    from diffusers import StableDiffusion3Pipeline

    first, second = text_encoders
    if vae.config.get("shift_factor") is None:  # SD 3's pipeline un-shifts latents: the tiny VAE's shift is 0
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_sampler(cfg),
        vae=vae,
        text_encoder=first,
        tokenizer=build_tokenizer(cfg),
        text_encoder_2=second,
        tokenizer_2=build_tokenizer(cfg),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# Training-time attention: the 256 identical zero slots as one.


class RepeatedKeyJointProcessor:
    """SD 3's joint attention, where the last text token stands for `copies` identical tokens.

    ``softmax`` over `copies` equal keys with equal values is the same as one key whose logit is
    raised by ``log(copies)``; the token's own query gives the same output for every copy. So a
    text stream of ``CLIP slots + 1`` tokens computes exactly what ``CLIP slots + copies`` would.
    Used only while training (``encoder_hidden_states`` then ends with the one zero slot).
    """

    def __init__(self, copies: int) -> None:
        self.copies = copies

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        # the joint computation's two halves as sdlens's hooks run them, with the key bias in between
        from sdlens.hooks.attention import joint_inputs, joint_output

        inputs = joint_inputs(attn, hidden_states, encoder_hidden_states)  # (B, heads, N, d) each
        bias = torch.zeros(1, inputs.key.shape[2], dtype=inputs.query.dtype, device=inputs.query.device)
        bias[0, -1] = math.log(self.copies)  # (1, N): added to every query's logits
        out = F.scaled_dot_product_attention(inputs.query, inputs.key, inputs.value, attn_mask=bias)
        return joint_output(attn, out, inputs, True)


class PromptCache:
    """Captions -> the pipeline's own prompt embeddings, CLIP slots only, cached per caption.

    Frozen text encoders (no `text_context_layers`): the world has a few hundred distinct captions,
    so each is encoded once, by the pipeline's `encode_prompt` (the exact path inference takes).
    With trained context layers every call encodes afresh, with gradients, by the same path.
    Returns (N, text_slots, 96) slot vectors and (N, 96) pooled vectors.
    """

    def __init__(self, pipe, cfg: Sd3Config) -> None:
        self.pipe, self.cfg = pipe, cfg
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.text_context_layers:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, None, None, do_classifier_free_guidance=False, device=device, max_sequence_length=1
            )
            return embeds[:, : self.cfg.text_slots].float(), pooled.float()
        with torch.no_grad():
            return self._cached(captions, device)

    def _cached(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                missing, None, None, do_classifier_free_guidance=False, device=device, max_sequence_length=1
            )  # (M, text_slots + 1, 96): the CLIP slots, then one zero slot
            for c, e, p in zip(missing, embeds[:, : self.cfg.text_slots].float(), pooled.float()):
                self.cache[c] = (e, p)
        slots = torch.stack([self.cache[c][0] for c in captions])
        pooled = torch.stack([self.cache[c][1] for c in captions])
        return slots, pooled


def color_token_ids(tokenizer) -> torch.Tensor:
    """(4,) the world's colour words' token ids; each must be one token, or a slot is not a word."""
    from sdlens.world.scene import COLORS

    colors = [tokenizer(c, add_special_tokens=False).input_ids for c in COLORS]
    if any(len(t) != 1 for t in colors):
        raise ModelError(f"each colour word must be one token of the tokenizer, got {dict(zip(COLORS, colors))}")
    return torch.tensor([t[0] for t in colors])


def color_slot_dropout(tokenizer, captions: list[str], color_ids: torch.Tensor, cfg: Sd3Config,
                       generator: torch.Generator) -> torch.Tensor:
    """Which slots to zero: each colour word's slot (a token of `color_ids`) with chance
    ``cfg.color_word_dropout``; no other slot.

    Returns a bool (N, text_slots) on the generator's device (slot i holds token i: SD 3's pipeline
    puts the CLIPs' slots side by side, feature-wise, in token order).
    """
    ids = tokenizer(captions, padding="max_length", max_length=cfg.text_slots, truncation=True,
                    return_tensors="pt").input_ids.to(generator.device)  # (N, S)
    is_color = torch.isin(ids, color_ids.to(ids.device))
    return is_color & (torch.rand(ids.shape, generator=generator, device=ids.device) < cfg.color_word_dropout)


def with_zero_slot(slots: torch.Tensor) -> torch.Tensor:
    """(N, S, D) CLIP slots -> (N, S + 1, D): one zero slot standing for the pipeline's 256 (see above)."""
    return torch.cat([slots, slots.new_zeros(slots.shape[0], 1, slots.shape[2])], dim=1)


def use_repeated_zero_slot(transformer, copies: int) -> None:
    transformer.set_attn_processor(RepeatedKeyJointProcessor(copies))


def noise_levels(n: int, cfg: Sd3Config, generator: torch.Generator, device) -> torch.Tensor:
    """(n,) noise levels s in (0, 1), logit-normal as SD 3 draws them."""
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator, device=device))


def flow_matching_loss(transformer, latents, slots, pooled, cfg: Sd3Config, generator) -> torch.Tensor:
    """Mean squared error of the predicted velocity along the straight noise path.

    latents (N, 4, 16, 16) scaled clean latents; slots (N, S + 1, 96) with the zero slot; pooled (N, 96).
    """
    n = latents.shape[0]
    s = noise_levels(n, cfg, generator, latents.device)  # (N,)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    noisy = (1 - s)[:, None, None, None] * latents + s[:, None, None, None] * noise
    velocity = transformer(
        hidden_states=noisy, timestep=s * 1000, encoder_hidden_states=slots, pooled_projections=pooled
    ).sample  # (N, 4, 16, 16); the sampler's timesteps are noise levels x 1000
    return F.mse_loss(velocity.float(), noise - latents)


# ---------------------------------------------------------------------------------------------
# The stage and the run.


def cut_pooled_input(transformer) -> None:
    """Zero and freeze the input weights of the pooled vector's projection (``time_text_embed.text_embedder``):
    its output is then its bias alone, the same for every prompt."""
    weight = transformer.time_text_embed.text_embedder.linear_1.weight
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)


def trained_text_encoders(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders that have trainable (context) layers, by pipeline attribute name."""
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
            if any(p.requires_grad for p in getattr(pipe, name).parameters())}


def train_transformer(run, budget, vae, pipe, prompts: PromptCache) -> dict[str, nn.Module]:
    """Train the transformer (and the text encoders' context layers, if any); returns the moving
    averages of the trained parts by pipeline attribute name (``"transformer"``, ``"text_encoder"``, ...).

    Each step: draw a batch of the world, encode the images with the frozen VAE (scaled as the
    pipeline unscales them), look up the captions' slots (10% replaced by "" for guidance), and
    regress the velocity (`flow_matching_loss`).
    """
    from sdlens.models.training import EMA, StageLoop, make_optimizer, sample

    cfg, device = run.cfg, run.device
    transformer = pipe.transformer.to(device).train()
    use_repeated_zero_slot(transformer, cfg.t5_slots)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    if not cfg.pooled_input:
        cut_pooled_input(transformer)
    modules = {"transformer": transformer, **trained_text_encoders(pipe)}
    for name, module in modules.items():
        if name != "transformer":
            module.train()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, budget.lr, device)
    emas = {name: EMA(m) for name, m in modules.items()}
    loop = StageLoop(run, "transformer", budget, modules, optimizer, emas)
    color_ids = color_token_ids(pipe.tokenizer) if cfg.color_word_dropout > 0 else None  # once, not per step
    while loop.running():
        loop.set_lr()
        g = loop.generator
        images, captions = sample(run, budget, g)  # (N, 3, 64, 64), N strings
        drop = torch.rand(len(captions), generator=g, device=device) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        slots, pooled = prompts(captions, device)  # (N, S, 96), (N, 96)
        if cfg.pooled_dropout > 0:  # the prompt's words must then come through the slots
            empty = prompts([""], device)[1]  # (1, 96)
            hit = torch.rand(len(captions), generator=g, device=device) < cfg.pooled_dropout
            pooled = torch.where(hit[:, None], empty, pooled)
        if cfg.color_word_dropout > 0:
            slots = slots * ~color_slot_dropout(pipe.tokenizer, captions, color_ids, cfg, g)[:, :, None]
        with torch.no_grad(), run.autocast():
            latents = vae.encode(images).latent_dist.sample(generator=g)  # (N, 4, 16, 16)
        latents = (latents.float() - shift) * scale
        with run.autocast():
            loss = flow_matching_loss(transformer, latents, with_zero_slot(slots), pooled, cfg, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for name, m in modules.items():
            emas[name].update(m, loop.step)
        loop.end_step(loss)
    loop.close()
    averaged = {name: emas[name].averaged(m) for name, m in modules.items()}
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    averaged["transformer"].set_attn_processor(JointAttnProcessor2_0())  # back to diffusers' own joint processor
    return averaged


def init_transformer_from(path: str | os.PathLike, transformer: nn.Module) -> None:
    """Load the transformer's weights from an exported tiny-sd3 folder (to continue with a fresh optimiser)."""
    from diffusers import SD3Transformer2DModel

    src = SD3Transformer2DModel.from_pretrained(Path(path) / "transformer", torch_dtype=torch.float32,
                                                local_files_only=True)
    transformer.load_state_dict(src.state_dict())


def init_text_encoders_from(path: str | os.PathLike, encoders: tuple) -> tuple:
    """The text encoders of an exported tiny-sd3 folder, where it has them with the layers `encoders`
    have (a run with context layers continued); otherwise `encoders` unchanged (their frozen parts are
    the seed's, as the folder's are, and their context layers start as the identity). A folder that
    keeps only the transformer (a committed checkpoint of a run without context layers) is read so too."""
    from transformers import CLIPTextModelWithProjection

    out = []
    for sub, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        if not (Path(path) / sub / "config.json").is_file():
            out.append(encoder)
            continue
        src = CLIPTextModelWithProjection.from_pretrained(Path(path) / sub, torch_dtype=torch.float32,
                                                          local_files_only=True)
        if src.config.num_hidden_layers == encoder.config.num_hidden_layers:
            encoder.load_state_dict(src.state_dict())  # values only: which parts train stays as built
        else:  # the frozen parts are the seed's either way; only trained context layers are not carried
            print(f"[init-from] {Path(path) / sub} has {src.config.num_hidden_layers} layers, this run's encoder "
                  f"{encoder.config.num_hidden_layers}: its context layers start as the identity", file=sys.stderr)
        out.append(encoder)
    return tuple(out)


def export_sd3(out: Path, cfg: Sd3Config, pipe) -> None:
    """Write the StableDiffusion3Pipeline folder, float16, with CLIP's vocab/merges tokenizer files.

    As in the UNet model's export, token-embedding rows no world caption uses are zeroed (they are
    random and never read on the world's captions; zeros compress).
    """
    from sdlens.models.training import prefix_text_encoder_keys, world_token_ids, write_clip_tokenizer

    parts = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = copy.deepcopy(getattr(pipe, name)).cpu().half()
    keep = torch.zeros(CLIP_VOCAB_SIZE, dtype=torch.bool)
    keep[world_token_ids(pipe.tokenizer)] = True
    for name in ("text_encoder", "text_encoder_2"):
        with torch.no_grad():
            parts[name].get_input_embeddings().weight[~keep] = 0
    from diffusers import StableDiffusion3Pipeline

    half = StableDiffusion3Pipeline(
        **parts, scheduler=build_sampler(cfg), tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    half.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"  # the absent T5 must be listed as absent, or loading refuses
    index = json.loads(index_path.read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    for sub in ("tokenizer", "tokenizer_2"):  # CLIP's own files (1.6 MB) with this model's slot count
        write_clip_tokenizer(out / sub, cfg.text_slots)
    for sub in ("text_encoder", "text_encoder_2"):
        prefix_text_encoder_keys(out / sub / "model.safetensors")


def default_budget():
    """The transformer stage's budget when none is given (`sdlens train-tiny --arch sd3` too)."""
    from sdlens.models.training import Budget

    return Budget(minutes=60, batch_size=64, lr=3e-4, warmup_steps=200)


def train_tiny_sd3(
    out: str | os.PathLike,
    cfg: Sd3Config | None = None,
    *,
    budget=None,
    vae_from: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    checkpoint_minutes: float = 10.0,
    command: list[str] | None = None,
    init_from: str | os.PathLike | None = None,
    precision: str = "auto",
) -> Path:
    """Train tiny-sd3's transformer on the shapes world and write its pipeline folder to `out`.

    vae_from: the folder of a trained VAE (default: the built-in model's, `sdlens/data/tiny`).
    budget:   a `train.Budget` for the transformer stage (steps and/or minutes, batch, lr).
    resume:   continue from `out`'s checkpoint; init_from: start from an exported tiny-sd3's weights.
    """
    from sdlens.models.load import TINY_DIR
    from sdlens.models.training import Run, describe_device, load_vae, versions, write_record

    cfg = cfg or Sd3Config()
    budget = budget or default_budget()
    out = Path(out)
    if not resume and (out / "train" / "checkpoints").exists():
        raise FileExistsError(
            f"{out} already holds a training run: pass --resume to continue it, or choose another --out"
        )
    run = Run(out, cfg, seed=seed, device=device, resume=resume, progress=progress, log_every=log_every,
              checkpoint_minutes=checkpoint_minutes, precision=precision)
    started = time.monotonic()
    print(f"training tiny-sd3 on {run.device} into {out}", file=sys.stderr)
    vae = load_vae(run, vae_from or TINY_DIR)
    text_encoders = tuple(t.to(run.device) for t in build_text_encoders(cfg, seed))
    torch.manual_seed(seed)
    transformer = build_transformer(cfg)
    if init_from is not None:
        init_transformer_from(init_from, transformer)
        text_encoders = init_text_encoders_from(init_from, text_encoders)
    pipe = build_pipeline(cfg, transformer, vae, text_encoders)
    prompts = PromptCache(pipe, cfg)
    for name, module in train_transformer(run, budget, vae, pipe, prompts).items():
        setattr(pipe, name, module)
    export_sd3(out, cfg, pipe)

    record = {
        "command": command,
        "arch": "sd3",
        "config": cfg.to_dict(),
        "seed": seed,
        "stages": run.stage_reports,
        "budgets": {"transformer": vars(budget)},
        "vae_from": str(vae_from or TINY_DIR),
        "device": describe_device(run.device),
        "precision": "bf16" if run.bf16 else "fp32",
        "wall_minutes": round((time.monotonic() - started) / 60, 2),
        "versions": versions(),
    }
    write_record(run, record, init_from=init_from)
    return out


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike, *, vae_from=None, seed: int = 0,
                      command: list[str] | None = None, precision: str | None = None) -> Path:
    """Export the moving average in a tiny-sd3 run's checkpoint (``RUN/train/checkpoints/transformer.pt``)
    as a pipeline folder, while the run goes on or after it was stopped. ``out/training.json`` records
    the checkpoint's step and minutes, this machine and the library versions (and ``command`` and
    ``precision``, the run's, when given). Returns ``out``."""
    from diffusers import AutoencoderKL

    from sdlens.models.load import TINY_DIR
    from sdlens.models.training import describe_device, versions

    run_dir, out = Path(run_dir), Path(out)
    checkpoint = run_dir / "train/checkpoints/transformer.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = Sd3Config.from_dict(state["config"])
    transformer = build_transformer(cfg)
    text_encoders = build_text_encoders(cfg, seed)
    parts = {"transformer": transformer, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]}
    for name, averages in state["emas"].items():
        for p, e in zip(parts[name].parameters(), averages["params"]):
            p.data.copy_(e)
    vae = AutoencoderKL.from_pretrained(Path(vae_from or TINY_DIR) / "vae", local_files_only=True).float()
    pipe = build_pipeline(cfg, transformer.eval(), vae, tuple(t.eval() for t in text_encoders))
    out.mkdir(parents=True, exist_ok=True)
    export_sd3(out, cfg, pipe)
    previous = run_dir / "training.json"
    record = json.loads(previous.read_text()) if previous.exists() else {
        "command": command, "arch": "sd3", "config": cfg.to_dict(), "seed": seed,
        "vae_from": str(vae_from or TINY_DIR), "device": describe_device(torch.device("cpu")),
        "precision": precision, "versions": versions()}
    record["exported_checkpoint"] = {"path": str(checkpoint), "step": state["step"],
                                     "minutes": round(state["elapsed_s"] / 60, 2)}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out

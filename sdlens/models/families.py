"""Random-weight pipelines of each Stable Diffusion family, built from configs (no download).

Used by the tests, the benchmarks and the anatomy views: the layouts are real, the weights are not.

The text side uses sdlens' shipped CLIP tokenizer (CLIP's real BPE, 49408 ids), so prompts,
tokens and words behave as in the real models.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..tokens import load_clip_tokenizer

VOCAB = 49408


def _clip_config(hidden=32, layers=2, projection_dim=None) -> CLIPTextConfig:
    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        max_position_embeddings=77,
        **kw,
    )


def _vae(latent_channels=4, **kw) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=2,
        **kw,
    )


def _sd_ddim() -> DDIMScheduler:
    """SD 1.x's noise schedule with a DDIM sampler."""
    return DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )


def _small_unet(**kw) -> UNet2DConditionModel:
    """A UNet at two resolutions (8 and 16 channels, one layer a block, 16×16×4 latents); ``kw`` on top."""
    base = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                norm_num_groups=4)
    return UNet2DConditionModel(**{**base, **kw})


def _sd_pipeline(unet, scheduler, vae=None, text_encoder=None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around ``unet``: the small VAE and a small CLIP text encoder unless given
    (made in that order, after the UNet), sdlens' CLIP tokenizer, no safety checker, no progress bar."""
    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else _vae(),
        text_encoder=text_encoder if text_encoder is not None else CLIPTextModel(_clip_config()),
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd1(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x family: CrossAttn blocks at two resolutions, 2 heads, 32-d context."""
    torch.manual_seed(seed)
    unet = _small_unet(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=32, attention_head_dim=2)
    return _sd_pipeline(unet, _sd_ddim()).to(torch.float32)


def sd2(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x family: linear projections in the transformer blocks, head_dim-style heads, v-prediction."""
    torch.manual_seed(seed)
    unet = _small_unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction", steps_offset=1)
    return _sd_pipeline(unet, sched)


def sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL family: two text encoders (concatenated 64-d context), pooled + time added embeddings."""
    torch.manual_seed(seed)
    unet = _small_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    tok2 = load_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=tok2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mmdit_pipeline(seed: int, *, shift: float = 1.0, t5: bool = False, **transformer) -> StableDiffusion3Pipeline:
    """A random SD 3-layout pipeline: an MMDiT (``transformer`` kwargs on top of a small base), two
    CLIP encoders with projection, and a T5 encoder (``t5``) or none (the pipeline's zero slots)."""
    torch.manual_seed(seed)
    config = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=64,
                  pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**{**config, **transformer}),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer_2=load_clip_tokenizer(),
        text_encoder_3=T5EncoderModel(_t5_config(width=64)).eval() if t5 else None,
        tokenizer_3=load_clip_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD 3 family: an MMDiT with joint attention over image and text tokens (T5 absent → zeros)."""
    return _mmdit_pipeline(seed)


def sd35(seed: int = 0, layers: int = 2, dual_layers: int = 1) -> StableDiffusion3Pipeline:
    """SD 3.5 family: SD 3's MMDiT with RMS-normalised queries and keys (qk-norm) and, in its first
    block, MMDiT-X's second attention (``attn2``: image tokens only, beside the joint one), as SD 3.5
    Medium has in its first 13 blocks (SD 3.5 Large has qk-norm and no second attention).

    Its third encoder is a T5 encoder with random weights; the shipped CLIP tokenizer stands in for
    T5's (only the token layout matters here: T5's slots follow the 77 CLIP slots).
    ``layers=24, dual_layers=13`` give SD 3.5 Medium's blocks; ``layers=38, dual_layers=0`` Large's.
    """
    return _mmdit_pipeline(seed, shift=3.0, t5=True, num_layers=layers, qk_norm="rms_norm",
                           dual_attention_layers=tuple(range(dual_layers)))


def _t5_config(width: int = 32) -> T5Config:
    """A 2-layer T5 encoder over the CLIP tokenizer's ids (its pad and end ids are CLIP's end token)."""
    return T5Config(
        vocab_size=VOCAB,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=49407,
        eos_token_id=49407,
        decoder_start_token_id=49407,
    )


def flux(seed: int = 0, layers: int = 1, single_layers: int = 2, heads: int = 2, head_dim: int = 16) -> FluxPipeline:
    """Flux.1 family: a rectified-flow transformer with double-stream blocks (joint attention, text
    first, each stream its own weights) then single-stream blocks (text and image as one sequence,
    one set of weights), rotary positions, 2×2 latent patches packed into tokens by the pipeline, and
    guidance distilled into an embedding (no classifier-free-guidance rows).

    Its prompt reaches the attention through the T5 encoder (``prompt_2``, default the prompt);
    CLIP gives only the pooled vector. The T5 encoder has random weights and the shipped CLIP
    tokenizer stands in for T5's (the random T5 takes any ``max_sequence_length=``).

    ``layers=19, single_layers=38`` give Flux.1's block counts (24 heads of 128 in the real model).
    """
    torch.manual_seed(seed)
    quarter = head_dim // 4  # rotary dimensions of the (time, row, column) axes; Flux.1 splits its 128 as 16, 56, 56
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(quarter, (head_dim - quarter) // 2, head_dim - quarter - (head_dim - quarter) // 2),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(_t5_config()).eval(),
        tokenizer_2=load_clip_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_layout_unet(width: int = 32, sample_size: int = 64, seed: int = 0) -> UNet2DConditionModel:
    """The SD 1.5 UNet's layout (block types, 2 layers per block, 8 heads, 768-d context) at reduced width.

    ``width=320`` gives the real SD 1.5 UNet (860 M parameters).
    """
    torch.manual_seed(seed)
    w = width
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(w, 2 * w, 4 * w, 4 * w),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=min(32, w),
    )


def sd15_layout(width: int = 32, sample_size: int = 64, seed: int = 0) -> StableDiffusionPipeline:
    """A pipeline around ``sd15_layout_unet`` (tiny VAE and a 768-wide, 1-layer text encoder)."""
    unet = sd15_layout_unet(width, sample_size, seed)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2)
    return _sd_pipeline(unet, _sd_ddim(), vae=vae, text_encoder=CLIPTextModel(_clip_config(hidden=768, layers=1)))


FAMILIES = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl, "sd3": sd3, "sd35": sd35, "flux": flux}

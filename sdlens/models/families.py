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
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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


def sd1(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x family: CrossAttn blocks at two resolutions, 2 heads, 32-d context."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def sd2(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x family: linear projections in the transformer blocks, head_dim-style heads, v-prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=4,
    )
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL family: two text encoders (concatenated 64-d context), pooled + time added embeddings."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
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


def sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD 3 family: an MMDiT with joint attention over image and text tokens (T5 absent → zeros)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=32)),
        tokenizer_2=load_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
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
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=2,
        ),
        text_encoder=CLIPTextModel(_clip_config(hidden=768, layers=1)),
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAMILIES = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl, "sd3": sd3}

"""Tiny random decoders in the exact Kandinsky v2.2 / Karlo folder layouts, built from configs.

The real decoders cannot be downloaded offline, so tests (ours and other packages') build these from the same
diffusers classes with small configs (the sizes diffusers' own pipeline tests use), save them with
`save_pretrained` and load them back through the same code paths as the real models.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_kandinsky_decoder(path: str | Path, embed_dim: int = 32, seed: int = 0) -> Path:
    """Write `unet/ movq/ scheduler/` (+ model_index.json) of a random Kandinsky v2.2 decoder taking `embed_dim`."""
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # learned variance: twice the latent channels, as Kandinsky's decoder
        addition_embed_type="image",
        encoder_hid_dim=embed_dim,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    # The scheduler config of kandinsky-community/kandinsky-2-2-decoder.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
        thresholding=False,
    )
    path = Path(path)
    KandinskyV22Pipeline(unet=unet.eval(), scheduler=scheduler, movq=movq.eval()).save_pretrained(path)
    return path


def save_tiny_karlo_decoder(path: str | Path, clip_dir: str | Path, seed: int = 0) -> Path:
    """Write a random Karlo decoder (text_proj, 16 px decoder, super-resolution to 32 px) with the text encoder of `clip_dir`.

    The layout is `kakaobrain/karlo-v1-alpha` without its prior: text_encoder/ tokenizer/ text_proj/ decoder/
    super_res_first/ super_res_last/ decoder_scheduler/ super_res_scheduler/.
    """
    from diffusers import UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    text_encoder = CLIPTextModelWithProjection.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    embed_dim = int(text_encoder.config.projection_dim)
    torch.manual_seed(seed)
    block = 32
    text_proj = UnCLIPTextProjModel(
        clip_embeddings_dim=embed_dim,
        time_embed_dim=block * 4,
        cross_attention_dim=64,
        clip_extra_context_tokens=4,
    )
    decoder = UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=6,  # learned-range variance
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(block, 2 * block),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )

    def super_res() -> UNet2DModel:
        return UNet2DModel(
            sample_size=32,
            layers_per_block=1,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            block_out_channels=(block, 2 * block),
            in_channels=6,
            out_channels=3,
        )

    parts = {
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_proj": text_proj,
        "decoder": decoder,
        "super_res_first": super_res(),
        "super_res_last": super_res(),
        # Karlo's scheduler configs: learned-range variance for the decoder, fixed for super-resolution.
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    }
    path = Path(path)
    for name, part in parts.items():
        part.save_pretrained(path / name)
    return path

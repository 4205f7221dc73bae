"""Real-size architectures for the GPU benchmarks, built from the released configs with random weights.

Speed and memory do not depend on the weights' values, only on the architecture, so every model here is built
from its published config and randomly initialised (no download: the benchmark runs on an offline machine).
The configs are written out from public facts:

- Kandinsky 2.2 decoder (kandinsky-community/kandinsky-2-2-decoder, unet/ and movq/ config.json): the UNet is the
  Kandinsky 2.1 decoder UNet of diffusers' `scripts/convert_kandinsky_to_diffusers.py` (`UNET_CONFIG`: channels
  384/768/1152/1536, 3 layers per block, 64-wide heads, 8 output channels) with 2.2's image-only conditioning
  (`encoder_hid_dim_type="image_proj"`, `encoder_hid_dim=1280`, `addition_embed_type="image"`); 1.25B parameters
  as built (the model card says 1.22B). MoVQ is that script's `MOVQ_CONFIG` (67.8M parameters; card: 67M).
- CLIP ViT-bigG-14 (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k config.json): vision 48 layers x 1664 wide (16 heads,
  MLP 8192, patch 14, 224 px), text 32 layers x 1280 (20 heads, MLP 5120), GELU, projection 1280.
- CLIP ViT-L/14 (openai/clip-vit-large-patch14 config.json): vision 24 x 1024 (16 heads, MLP 4096), text 12 x 768
  (12 heads, MLP 3072), quick-GELU, projection 768.
- The 1B Kandinsky 2.2 prior: `prior_latency.KANDINSKY_PRIOR` (diffusers PriorTransformer defaults, width 1280).

The tokenizer is the shipped shapes CLIP's (a word-level tokenizer; the real BPE files cannot be downloaded
offline) padded to CLIP's 77 tokens: the text tower's cost depends only on the padded length. `smoke=True` swaps
every architecture for a tiny one of the same classes, so the whole GPU script can be run on a CPU in seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

SHAPES_CLIP = Path(__file__).resolve().parents[1] / "src" / "eclipse_prior" / "shapes" / "weights" / "clip"

KANDINSKY22_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 768,
    "cross_attention_norm": None,
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 3,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "upcast_attention": False,
    "use_linear_projection": False,
}

KANDINSKY22_MOVQ: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "num_vq_embeddings": 16384,
    "block_out_channels": [128, 256, 256, 512],
    "vq_embed_dim": 4,
    "layers_per_block": 2,
    "norm_type": "spatial",
}

# DDPM as the decoder's scheduler (its arithmetic is negligible next to the UNet: the choice does not move timings).
KANDINSKY22_SCHEDULER: dict[str, Any] = {
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "variance_type": "fixed_small",
}

CLIP_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "vit-bigg-14": {
        "vision": {
            "hidden_size": 1664,
            "intermediate_size": 8192,
            "num_hidden_layers": 48,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
        "text": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
    },
    "vit-l-14": {
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
    },
    # smoke runs only: same classes, 224 px input, tiny towers
    "tiny": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 32,
            "image_size": 224,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
    },
}

# openai/clip-vit-large-patch14 preprocessor_config.json (laion's bigG uses the same 224 px pipeline and statistics)
CLIP_IMAGE_PROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

TINY_UNET: dict[str, Any] = {
    **KANDINSKY22_UNET,
    "block_out_channels": [32, 64],
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
    "sample_size": 8,
}
TINY_MOVQ: dict[str, Any] = {
    **KANDINSKY22_MOVQ,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "num_vq_embeddings": 12,
}


def param_count(model: torch.nn.Module) -> int:
    """Parameters of a module."""
    return sum(p.numel() for p in model.parameters())


def build_decoder(device: torch.device, dtype: torch.dtype, smoke: bool = False) -> tuple[Any, Any, Any]:
    """(unet, scheduler, movq) of the Kandinsky 2.2 decoder, random weights, on `device` in `dtype`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if smoke else KANDINSKY22_UNET))
        movq = VQModel(**(TINY_MOVQ if smoke else KANDINSKY22_MOVQ))
    return unet.to(dtype).eval(), DDPMScheduler(**KANDINSKY22_SCHEDULER), movq.to(dtype).eval()


def build_big_prior(device: torch.device, dtype: torch.dtype, smoke: bool = False, width: int = 1280) -> Any:
    """The 1B Kandinsky 2.2 PriorTransformer (random weights) and its UnCLIPScheduler; smoke: 2 layers, 2 heads."""
    from diffusers import PriorTransformer

    from prior_latency import KANDINSKY_PRIOR

    cfg = copy.deepcopy(KANDINSKY_PRIOR)
    cfg["embedding_dim"] = width
    if smoke:
        cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=16)
    torch.manual_seed(0)
    with torch.device(device):
        prior = PriorTransformer(**cfg)
    return prior.to(dtype).eval()


def prior_scheduler() -> Any:
    """The Kandinsky 2.2 prior's UnCLIPScheduler (kandinsky-community/kandinsky-2-2-prior scheduler config)."""
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(
        clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000, prediction_type="sample",
        variance_type="fixed_small_log",
    )


def tokenizer(max_length: int = 77) -> Any:
    """The shipped shapes tokenizer padded to `max_length` tokens (see the module docstring)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHAPES_CLIP), local_files_only=True)
    tok.model_max_length = max_length
    return tok


def clip_towers(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(CLIPTextModelWithProjection, CLIPVisionModelWithProjection) of `name` (CLIP_CONFIGS), random weights."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    cfg = CLIP_CONFIGS[name]
    tok = tokenizer()
    text_cfg = CLIPTextConfig(**cfg["text"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        text = CLIPTextModelWithProjection(text_cfg)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"]))
    return text.to(dtype).eval(), vision.to(dtype).eval()


def clip_bundle(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """An `eclipse_prior.encoders.clip.ClipBundle` of a real-size CLIP architecture with random weights."""
    from transformers import CLIPImageProcessor

    from eclipse_prior.encoders.clip import ClipBundle

    text, vision = clip_towers(name, device, dtype)
    return ClipBundle(
        tokenizer=tokenizer(),
        text_model=text,
        vision_model=vision,
        image_processor=CLIPImageProcessor(**CLIP_IMAGE_PROCESSOR),
        name=f"random-weights {name}",
        revision="none",
        embed_dim=CLIP_CONFIGS[name]["vision"]["projection_dim"],
        max_length=77,
        device=torch.device(device),
        dtype=dtype,
    )

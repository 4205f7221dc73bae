"""ECLIPSE (or any) prior + the Kandinsky v2.2 decoder, as one diffusers pipeline.

The decoding itself is diffusers' own `KandinskyV22Pipeline` built from this pipeline's `unet`, `scheduler`
and `movq`; this class adds the text side (CLIP text encoder -> prior -> image embedding) and the negative
image embedding rule of `KandinskyV22PriorPipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from eclipse_prior.encoders._hf import quiet_transformers
from eclipse_prior.errors import ConfigError
from eclipse_prior.pipelines.common import (
    EclipsePipelineOutput,
    TextEncoding,
    apply_offload,
    check_widths,
    encode_prompts,
    free_modules,
    load_saved_components,
    run_prior,
)

# diffusers' unCLIP/Kandinsky modules look up transformers.CLIPImageProcessor, which without torchvision logs a
# fallback notice on every run; the PIL processor it falls back to is the one this project uses, so hide it.
with quiet_transformers():
    from diffusers import DiffusionPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline


@dataclass
class KandinskyEmbeds:
    """What the Kandinsky decoder consumes: image embeddings and their negatives, (B, E) each."""

    image_embeds: torch.Tensor
    negative_image_embeds: torch.Tensor


class EclipseKandinskyV22Pipeline(DiffusionPipeline):
    """Text -> prior -> CLIP image embedding -> Kandinsky v2.2 decoder (UNet + MoVQ).

    Components: `prior` (EclipsePrior, DiffusionPrior or the original PriorTransformer, which also needs
    `prior_scheduler`), `text_encoder` (CLIPTextModelWithProjection) and `tokenizer`, `image_encoder`
    (CLIPVisionModelWithProjection, only for the zero-image negative embedding) and `image_processor` (kept so a
    saved pipeline folder is also a CLIP folder for `load_clip`), and the decoder's `unet`, `scheduler`, `movq`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->prior->unet->movq"
    _optional_components = ["image_encoder", "image_processor", "prior_scheduler"]

    def __init__(
        self,
        prior: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        movq: Any,
        image_encoder: Any = None,
        image_processor: Any = None,
        prior_scheduler: Any = None,
    ):
        super().__init__()
        self.register_modules(
            prior=prior,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            movq=movq,
            image_encoder=image_encoder,
            image_processor=image_processor,
            prior_scheduler=prior_scheduler,
        )
        check_widths(prior, text_encoder, self.decoder_embedding_width, "Kandinsky v2.2")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> EclipseKandinskyV22Pipeline:
        """Load a folder written by `save_pretrained` (or its hub copy) by loading each component ourselves.

        diffusers' generic loader cannot resolve our prior classes; keyword arguments
        `torch_dtype`, `revision`, `local_files_only` and `cache_dir` are honoured, components passed by name
        are used as given.
        """
        expected, _ = cls._get_signature_keys(cls)
        return cls(**load_saved_components(pretrained_model_name_or_path, expected, kwargs))

    @property
    def decoder_embedding_width(self) -> int:
        """The image-embedding width the UNet's image conditioning takes (1280 for Kandinsky v2.2)."""
        return int(self.unet.config.encoder_hid_dim)

    def _encode(self, prompts: list[str]) -> TextEncoding:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self._execution_device)

    def zero_image_embeds(self, batch_size: int) -> torch.Tensor:
        """CLIP image embedding of an all-zero pixel tensor, computed by diffusers' own `get_zero_embed`.

        Note that diffusers feeds zeros as `pixel_values` directly (zero after normalisation, not a black image
        through the processor); reusing its method keeps us identical to `KandinskyV22PriorPipeline`.
        """
        if self.image_encoder is None:
            raise ConfigError(
                "the zero-image negative embedding needs the CLIP image encoder; use a CLIP with its vision "
                "tower (--clip) or pass a negative prompt"
            )
        return KandinskyV22PriorPipeline.get_zero_embed(self, batch_size, device=self._execution_device)

    @torch.no_grad()
    def prepare_embeds(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
    ) -> KandinskyEmbeds:
        """Prompt(s) -> prior image embeddings; negative = zero-image embedding or prior(negative_prompt).

        The prior's noise comes from `generator` (positive prompts first, then negative prompts), so the same
        generator state gives the same embeddings.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        uncond = None

        def uncond_fn() -> TextEncoding:
            nonlocal uncond
            if uncond is None:
                uncond = self._encode([""] * len(prompts))
            return uncond

        steps, guidance = prior_num_inference_steps, prior_guidance_scale
        image_embeds = run_prior(
            self.prior, self.prior_scheduler, self._encode(prompts), uncond_fn, generator, steps, guidance
        )
        if negative_prompt is None:
            negative = self.zero_image_embeds(len(prompts))
        else:
            negatives = (
                [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            )
            if len(negatives) != len(prompts):
                raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
            negative = run_prior(
                self.prior,
                self.prior_scheduler,
                self._encode(list(negatives)),
                uncond_fn,
                generator,
                steps,
                guidance,
            )
        return KandinskyEmbeds(image_embeds, negative)

    @torch.no_grad()
    def decode(
        self,
        embeds: KandinskyEmbeds,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        output_type: str = "pil",
    ) -> Any:
        """Decode with diffusers' `KandinskyV22Pipeline` sharing this pipeline's unet, scheduler and movq."""
        decoder = KandinskyV22Pipeline(unet=self.unet, scheduler=self.scheduler, movq=self.movq)
        decoder.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return decoder(
            image_embeds=embeds.image_embeds,
            negative_image_embeds=embeds.negative_image_embeds,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
        ).images

    def free_text_models(self) -> None:
        """Drop the prior and the CLIP encoders (after `prepare_embeds`) so decoding has their memory."""
        free_modules(self, ["prior", "text_encoder", "image_encoder"])

    def enable_offload(self, offload: str) -> None:
        """`"model"` or `"sequential"` CPU offload through diffusers (needs a CUDA GPU); `"none"` does nothing."""
        apply_offload(self, offload)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> EclipsePipelineOutput:
        """Generate images; the output also holds the exact embeddings the decoder received."""
        embeds = self.prepare_embeds(
            prompt, negative_prompt, generator, prior_num_inference_steps, prior_guidance_scale
        )
        images = self.decode(
            embeds, generator, num_inference_steps, guidance_scale, height, width, output_type
        )
        return EclipsePipelineOutput(images, embeds.image_embeds, embeds.negative_image_embeds)

"""ECLIPSE (or any) prior + the Karlo unCLIP decoder (text_proj, 64 px decoder, super-resolution to 256).

diffusers 0.42 keeps UnCLIP only in `diffusers.pipelines.deprecated.unclip`, and `UnCLIPPipeline.from_pretrained`
of a saved folder fails there (`UnCLIPTextProjModel` is no longer exported from `diffusers`, so the loader cannot
resolve the `text_proj` entry of `model_index.json`). We therefore load every component ourselves, by class
(`load_pipeline` for Karlo's folder layout, `from_pretrained` for saved pipelines). Decoding reuses
`UnCLIPImageVariationPipeline`, which accepts given image embeddings, with its prompt encoding replaced by the
real caption's (the image-variation pipeline conditions on an empty caption, the text-to-image `UnCLIPPipeline`
on the prompt, which is what Karlo with a prior does); with Karlo's own prior the result is pixel-equal to
`UnCLIPPipeline` (tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

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
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline


@dataclass
class KarloEmbeds:
    """What the Karlo decoder consumes: prior image embeddings plus the prompt's and the unconditional text."""

    image_embeds: torch.Tensor
    text: TextEncoding
    uncond_text: TextEncoding


class _TextConditionedUnCLIPDecoder(UnCLIPImageVariationPipeline):
    """diffusers' unCLIP decoding from given image embeddings, conditioned on a given caption encoding.

    Only the two input hooks change: `_encode_prompt` returns the precomputed caption encoding (instead of
    encoding ""), `_encode_image` passes the embeddings through (there is no image encoder here).
    """

    encodings: KarloEmbeds

    def _encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance):
        text, uncond = self.encodings.text, self.encodings.uncond_text
        if not do_classifier_free_guidance:
            return text.embeds, text.states, text.mask
        return (
            torch.cat([uncond.embeds, text.embeds]),
            torch.cat([uncond.states, text.states]),
            torch.cat([uncond.mask, text.mask]),
        )

    def _encode_image(self, image, device, num_images_per_prompt, image_embeddings=None):
        return image_embeddings.to(device)


class EclipseKarloPipeline(DiffusionPipeline):
    """Text -> prior -> CLIP ViT-L/14 image embedding -> Karlo's decoder and two super-resolution UNets.

    Components follow `kakaobrain/karlo-v1-alpha` minus Karlo's prior, which `prior` replaces (EclipsePrior,
    DiffusionPrior, or Karlo's own PriorTransformer together with `prior_scheduler`).
    """

    model_cpu_offload_seq = "text_encoder->prior->text_proj->decoder->super_res_first->super_res_last"
    _optional_components = ["prior_scheduler"]

    def __init__(
        self,
        prior: Any,
        text_encoder: Any,
        tokenizer: Any,
        text_proj: Any,
        decoder: Any,
        super_res_first: Any,
        super_res_last: Any,
        decoder_scheduler: Any,
        super_res_scheduler: Any,
        prior_scheduler: Any = None,
    ):
        super().__init__()
        self.register_modules(
            prior=prior,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_proj=text_proj,
            decoder=decoder,
            super_res_first=super_res_first,
            super_res_last=super_res_last,
            decoder_scheduler=decoder_scheduler,
            super_res_scheduler=super_res_scheduler,
            prior_scheduler=prior_scheduler,
        )
        check_widths(prior, text_encoder, self.decoder_embedding_width, "Karlo")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> EclipseKarloPipeline:
        """Load a folder written by `save_pretrained` (or its hub copy) by loading each component ourselves.

        diffusers' generic loader cannot resolve our prior classes nor `UnCLIPTextProjModel`; keyword arguments
        `torch_dtype`, `revision`, `local_files_only` and `cache_dir` are honoured, components passed by name
        are used as given.
        """
        expected, _ = cls._get_signature_keys(cls)
        return cls(**load_saved_components(pretrained_model_name_or_path, expected, kwargs))

    @property
    def decoder_embedding_width(self) -> int:
        """The CLIP embedding width `text_proj` takes (768 for Karlo's ViT-L/14)."""
        return int(self.text_proj.config.clip_embeddings_dim)

    @property
    def image_size(self) -> int:
        """Output side in pixels: the super-resolution UNets' sample size (256 for Karlo)."""
        return int(self.super_res_first.config.sample_size)

    def _encode(self, prompts: list[str]) -> TextEncoding:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self._execution_device)

    @torch.no_grad()
    def prepare_embeds(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
    ) -> KarloEmbeds:
        """Prompt(s) -> prior image embeddings plus the text encodings the decoder needs.

        The unconditional decoder branch uses `text_proj`'s learned image embedding with the empty caption, as
        `UnCLIPPipeline` does; a `negative_prompt` replaces that empty caption.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(negatives) != len(prompts):
                raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        text = self._encode(prompts)
        uncond = self._encode(negatives)
        empty = uncond if negative_prompt is None else None

        def uncond_fn() -> TextEncoding:
            return empty if empty is not None else self._encode([""] * len(prompts))

        image_embeds = run_prior(
            self.prior,
            self.prior_scheduler,
            text,
            uncond_fn,
            generator,
            prior_num_inference_steps,
            prior_guidance_scale,
        )
        return KarloEmbeds(image_embeds, text, uncond)

    def _decoder(self) -> _TextConditionedUnCLIPDecoder:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its deprecation notice is about UnCLIP, which we use knowingly
        try:
            decoder = _TextConditionedUnCLIPDecoder(
                decoder=self.decoder,
                text_encoder=None,
                tokenizer=None,
                text_proj=self.text_proj,
                feature_extractor=None,
                image_encoder=None,
                super_res_first=self.super_res_first,
                super_res_last=self.super_res_last,
                decoder_scheduler=self.decoder_scheduler,
                super_res_scheduler=self.super_res_scheduler,
            )
        finally:
            diffusers_logging.set_verbosity(level)
        decoder.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return decoder

    @torch.no_grad()
    def decode(
        self,
        embeds: KarloEmbeds,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 8.0,
        super_res_num_inference_steps: int = 7,
        output_type: str = "pil",
    ) -> Any:
        """Decoder (with guidance) then the two super-resolution UNets, by diffusers' unCLIP code."""
        decoder = self._decoder()
        decoder.encodings = embeds
        dtype = self.decoder.dtype
        return decoder(
            image_embeddings=embeds.image_embeds.to(dtype),
            decoder_num_inference_steps=num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps,
            decoder_guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
        ).images

    def free_text_models(self) -> None:
        """Drop the prior and the text encoder (after `prepare_embeds`) so decoding has their memory."""
        free_modules(self, ["prior", "text_encoder"])

    def enable_offload(self, offload: str) -> None:
        """`"model"` or `"sequential"` CPU offload through diffusers (needs a CUDA GPU); `"none"` does nothing."""
        apply_offload(self, offload)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 8.0,
        prior_num_inference_steps: int = 25,
        prior_guidance_scale: float = 4.0,
        super_res_num_inference_steps: int = 7,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> EclipsePipelineOutput:
        """Generate images; the output also holds the exact image embeddings the decoder received."""
        embeds = self.prepare_embeds(
            prompt, negative_prompt, generator, prior_num_inference_steps, prior_guidance_scale
        )
        images = self.decode(
            embeds, generator, num_inference_steps, guidance_scale, super_res_num_inference_steps, output_type
        )
        return EclipsePipelineOutput(images, embeds.image_embeds)

"""Pieces both unCLIP pipelines share: text encoding, running any prior, width checks, memory options.

A "prior" here is any of: our `EclipsePrior` (one pass), our `DiffusionPrior` (steps + guidance), or the
original diffusers `PriorTransformer` of Kandinsky v2.2 / Karlo (sampled with its `UnCLIPScheduler`, exactly as
`KandinskyV22PriorPipeline` and `UnCLIPPipeline` do), so that priors can be compared on one decoder.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from eclipse_prior.config import read_json_object
from eclipse_prior.errors import ConfigError, ModelNotFoundError


class IncompatibleModelsError(ConfigError):
    """The prior, the text encoder and the decoder disagree on an embedding width."""


@dataclass
class TextEncoding:
    """CLIP text encoder output for a batch of prompts: pooled `text_embeds`, per-token states and mask."""

    embeds: torch.Tensor  # (B, E) projected pooled embedding
    states: torch.Tensor  # (B, L, D) last_hidden_state
    mask: torch.Tensor  # (B, L) bool tokenizer mask


@dataclass
class EclipsePipelineOutput(BaseOutput):
    """Images plus the exact embeddings the decoder was given, so callers can inspect or reuse them.

    `negative_image_embeds` is the Kandinsky negative (zero-image embedding or prior(negative_prompt)); Karlo
    has none (its unconditional branch uses `text_proj`'s learned embedding) and leaves it None.
    """

    images: list[PIL.Image.Image] | Any
    image_embeds: torch.Tensor
    negative_image_embeds: torch.Tensor | None = None


def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device
) -> TextEncoding:
    """Tokenize padded to the tokenizer's max length and run `CLIPTextModelWithProjection`.

    Same as diffusers' Kandinsky/unCLIP `_encode_prompt`: input ids only (no attention mask to the encoder;
    the mask goes to the prior, which masks the padded positions).
    """
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = text_encoder(tokens.input_ids.to(device))
    return TextEncoding(out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool().to(device))


def is_diffusers_prior(prior: Any) -> bool:
    """True for the original diffusion `PriorTransformer` (it needs a scheduler and an unconditional text)."""
    from diffusers import PriorTransformer

    return isinstance(prior, PriorTransformer)


def prior_output_width(prior: Any) -> int:
    """Width of the image embedding a prior produces (PriorTransformer: clip_embed_dim if set)."""
    cfg = prior.config
    return int(getattr(cfg, "clip_embed_dim", None) or cfg.embedding_dim)


def prior_text_width(prior: Any) -> int:
    """Width of the pooled text embedding a prior takes (embedding_proj_dim if set)."""
    cfg = prior.config
    return int(getattr(cfg, "embedding_proj_dim", None) or cfg.embedding_dim)


def prior_uses_text_states(prior: Any) -> bool:
    """Whether the prior reads per-token text states (False for our pooled-only priors)."""
    if is_diffusers_prior(prior):
        return prior.encoder_hidden_states_proj is not None
    return bool(getattr(prior, "uses_text_states", True))


def check_widths(prior: Any, text_encoder: Any, decoder_width: int, decoder_name: str) -> None:
    """Fail early with one line when the prior cannot feed this decoder or read this text encoder."""
    if prior is None:
        return
    out_w = prior_output_width(prior)
    if out_w != decoder_width:
        raise IncompatibleModelsError(
            f"the prior produces image embeddings of width {out_w} but the {decoder_name} decoder expects width "
            f"{decoder_width}; use a prior trained for this decoder's CLIP"
        )
    if text_encoder is None:
        return
    text_w = int(text_encoder.config.projection_dim)
    if text_w != prior_text_width(prior):
        raise IncompatibleModelsError(
            f"the text encoder gives text embeddings of width {text_w} but the prior expects width "
            f"{prior_text_width(prior)}; pass the CLIP the prior was trained with"
        )
    if prior_uses_text_states(prior):
        state_w = int(text_encoder.config.hidden_size)
        if state_w != int(prior.config.embedding_dim):
            raise IncompatibleModelsError(
                f"the text encoder gives per-token states of width {state_w} but the prior expects width "
                f"{prior.config.embedding_dim}; pass the CLIP the prior was trained with"
            )


@torch.no_grad()
def sample_diffusers_prior(
    prior: Any,
    scheduler: Any,
    cond: TextEncoding,
    uncond: TextEncoding,
    generator: torch.Generator | None,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """The prior loop of `KandinskyV22PriorPipeline` / `UnCLIPPipeline` for an original `PriorTransformer`.

    Those pipelines only expose it fused with their own prompt handling (and UnCLIP with its decoder), so the
    loop is repeated here with the same noise draws; the tests check equality with `KandinskyV22PriorPipeline`.
    """
    if scheduler is None:
        raise ConfigError(
            "an original diffusion PriorTransformer needs its UnCLIPScheduler (prior_scheduler)"
        )
    do_cfg = guidance_scale > 1.0
    device, dtype = prior.device, prior.dtype
    embeds, states, mask = cond.embeds, cond.states, cond.mask
    if do_cfg:
        embeds = torch.cat([uncond.embeds, embeds])
        states = torch.cat([uncond.states, states])
        mask = torch.cat([uncond.mask, mask])
    embeds, states, mask = embeds.to(device, dtype), states.to(device, dtype), mask.to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = randn_tensor(
        (cond.embeds.shape[0], prior.config.embedding_dim), generator=generator, device=device, dtype=dtype
    )
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        pred = prior(
            model_input, timestep=t, proj_embedding=embeds, encoder_hidden_states=states, attention_mask=mask
        ).predicted_image_embedding
        if do_cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_text - pred_uncond)
        prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]
        latents = scheduler.step(
            pred, timestep=t, sample=latents, generator=generator, prev_timestep=prev_timestep
        ).prev_sample
    return prior.post_process_latents(latents)


def run_prior(
    prior: Any,
    prior_scheduler: Any,
    cond: TextEncoding,
    uncond_fn: Any,
    generator: torch.Generator | None,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Image embeddings (B, E) from any supported prior.

    `uncond_fn()` returns the empty-prompt encoding; it is only called for the original diffusion prior, whose
    classifier-free guidance needs it (our DiffusionPrior guides with its own dropped condition).
    """
    if prior is None:
        raise ConfigError("the prior was freed (free_text_models); reload the pipeline to encode new prompts")
    if is_diffusers_prior(prior):
        return sample_diffusers_prior(
            prior, prior_scheduler, cond, uncond_fn(), generator, num_inference_steps, guidance_scale
        )
    use_states = prior_uses_text_states(prior)
    return prior.generate_embeds(
        cond.embeds,
        cond.states if use_states else None,
        cond.mask if use_states else None,
        generator=generator,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )


# Files a pipeline folder needs (safetensors weights, configs, tokenizer files); never pickles.
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def load_weights(cls: Any, folder: Path, dtype: torch.dtype | None = None) -> Any:
    """`cls.from_pretrained` from safetensors only, in eval mode; failure is one line naming the folder."""
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        return cls.from_pretrained(folder, **kwargs).eval()
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelNotFoundError(
            f"cannot load {cls.__name__} from {folder} ({reason}); a folder needs safetensors weights "
            f"(pickled .bin files are never loaded)"
        ) from err


def load_component(
    folder: Path, name: str, library: str, class_name: str, torch_dtype: torch.dtype | None
) -> Any:
    """Load one component subfolder by the (library, class) that `save_pretrained` recorded.

    diffusers' generic loader cannot load our priors (their module does not expose `ModelMixin`) nor
    `UnCLIPTextProjModel` (no longer exported from `diffusers`), so components are loaded here. Only classes of
    diffusers, transformers and `eclipse_prior.models` are looked up, never an arbitrary import path.
    """
    import diffusers
    import transformers

    if library == "transformers":
        cls = getattr(transformers, class_name, None)
    elif class_name == "UnCLIPTextProjModel":
        from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel as cls
    elif library == "diffusers":
        cls = getattr(diffusers, class_name, None)
    elif str(library).startswith("eclipse_prior."):
        import eclipse_prior.models as models

        cls = getattr(models, class_name, None)
    else:
        cls = None
    if cls is None:
        raise ConfigError(f"{folder}: cannot load component {name!r} of class {library}.{class_name}")
    if not issubclass(cls, torch.nn.Module):  # tokenizer, image processor, scheduler
        return cls.from_pretrained(folder / name)
    return load_weights(cls, folder / name, torch_dtype)


def load_saved_components(
    name_or_path: str | os.PathLike, expected: list[str], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Components of a pipeline folder written by `save_pretrained` (a local path or a hub id).

    Components passed in `kwargs` are used as given instead of being loaded.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        keys = ("revision", "local_files_only", "cache_dir", "token")
        folder = Path(
            snapshot_download(
                str(name_or_path), allow_patterns=SAFE_PATTERNS, **{k: kwargs[k] for k in keys if k in kwargs}
            )
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"{folder} has no model_index.json: not a folder written by save_pretrained")
    index = read_json_object(index_file, "restore it or save the pipeline again")
    components: dict[str, Any] = {}
    for name in expected:
        if name in kwargs:
            components[name] = kwargs[name]
            continue
        entry = index.get(name, [None, None])
        if not (isinstance(entry, list) and len(entry) == 2 and all(v is None or isinstance(v, str) for v in entry)):
            raise ConfigError(f"{index_file}: component {name!r} must be [library, class], got {entry!r}")
        library, class_name = entry
        components[name] = (
            None
            if library is None
            else load_component(folder, name, library, class_name, kwargs.get("torch_dtype"))
        )
    return components


def free_modules(pipe: Any, names: list[str]) -> None:
    """Drop components (set them to None in the pipeline) and return their memory before decoding."""
    pipe.register_modules(**dict.fromkeys(names))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_offload(offload: str | None) -> None:
    """Offload modes are none, model and sequential; the last two need a CUDA GPU (one line otherwise)."""
    if offload in (None, "none"):
        return
    if offload not in ("model", "sequential"):
        raise ConfigError(f"offload must be none, model or sequential, got {offload!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--offload {offload} needs a CUDA GPU (it moves models between CPU and GPU); none found"
        )


def apply_offload(pipe: Any, offload: str | None) -> None:
    """diffusers' model ("model") or sequential ("sequential") CPU offload, checked first by `check_offload`.

    Checked here so that on a CPU-only machine the user gets one line instead of diffusers' traceback.
    """
    check_offload(offload)
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()

"""The generation runner behind `eclipse-prior generate`: models by id or path, seeds, PNGs, grids, sidecars.

Every image is made alone (batch 1) from its own `torch.Generator` seeded with its own seed, on the CPU
generator, so an image depends only on its sidecar's settings: not on the batch it was made in, the other
prompts, or the device's random number generator. `regenerate(sidecar)` therefore reproduces it exactly
(pixel-equal on the same machine and software versions, which the sidecar records).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eclipse_prior.config import read_json_object
from eclipse_prior.errors import ConfigError, ModelNotFoundError
from eclipse_prior.pipelines.common import check_offload, load_weights

SIDECAR_FORMAT = "eclipse-prior-sidecar/1"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DecoderPreset:
    """Hub ids and paper settings of a real decoder."""

    kind: str
    repo: str
    clip: str | None  # None: the text encoder ships inside the decoder repo
    prior: str
    steps: int
    guidance: float


DECODERS: dict[str, DecoderPreset] = {
    "kandinsky22": DecoderPreset(
        "kandinsky22",
        "kandinsky-community/kandinsky-2-2-decoder",
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
        "ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior",
        50,
        7.5,
    ),
    "karlo": DecoderPreset(
        "karlo", "kakaobrain/karlo-v1-alpha", None, "ECLIPSE-Community/ECLIPSE_Karlo_Prior", 25, 8.0
    ),
}
KANDINSKY_SIZE = 512

# What to fetch from the hub per role: configs, tokenizer files and safetensors weights, never pickles.
_IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx*", "*fp16*", "open_clip*"]
_PATTERNS = {
    # root files only (fnmatch's * crosses folders): a prior repo may also hold multi-GB CLIP towers
    "prior": [
        "model_index.json",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "prior/*",
        "scheduler/*",
        "prior_scheduler/*",
    ],
    "decoder": [
        "model_index.json",
        *(
            f"{d}/*"
            for d in (
                "unet",
                "movq",
                "scheduler",
                "text_encoder",
                "tokenizer",
                "text_proj",
                "decoder",
                "super_res_first",
                "super_res_last",
                "decoder_scheduler",
                "super_res_scheduler",
            )
        ),
    ],
    "clip": [
        "*.json",
        "*.txt",
        "model.safetensors",
        "text_encoder/*",
        "tokenizer/*",
        "image_encoder/*",
        "image_processor/*",
    ],
}
_FLAGS = {"prior": "--prior", "decoder": "--decoder", "clip": "--clip"}


@dataclass
class ResolvedModel:
    """A model as the user named it, the local folder it was loaded from, and its hub revision if any."""

    id: str
    path: str
    revision: str | None = None
    weights: dict[str, str] | None = None  # local folders: sha256 of each weight file (hub ones: the revision)


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """sha256 of each ``*.safetensors`` file under a local model folder, by relative path.

    A local folder has no revision, and a run dir's ``prior/`` is replaced at every checkpoint: these digests are
    what lets a sidecar tell that the weights it was made with are still the ones there. A run dir's
    ``checkpoints/`` are not what gets loaded and are left out.
    """
    import hashlib

    root = Path(folder)
    digests = {}
    for file in sorted(root.rglob("*.safetensors")):
        rel = file.relative_to(root)
        if rel.parts[0] == "checkpoints":
            continue
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[rel.as_posix()] = h.hexdigest()
    return digests


def resolve_model(
    spec: str, role: str, revision: str | None = None, local_files_only: bool | None = None
) -> ResolvedModel:
    """A local folder as is, or a hub id fetched (or found in the cache) as a pinned snapshot folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedModel(spec, str(path.resolve()), weights=weights_sha256(path))
    flag = _FLAGS[role]
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        raise ModelNotFoundError(
            f"{role} {spec!r} is not a folder (nor a hub id); pass a local folder with {flag}"
        )
    from huggingface_hub import snapshot_download

    from eclipse_prior.encoders._hf import hub_resolves, offline_default

    unreachable = not local_files_only and not offline_default() and not hub_resolves()
    try:
        folder = snapshot_download(
            spec,
            revision=revision,
            allow_patterns=_PATTERNS[role],
            ignore_patterns=_IGNORE,
            # without DNS for the hub, use the cache only: one line now instead of a minute of retries
            local_files_only=bool(local_files_only) or unreachable,
        )
    except Exception as err:  # huggingface_hub raises many types (offline, not found, gated, HTTP)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        if unreachable:
            reason = f"the model hub is unreachable; {reason}"
        raise ModelNotFoundError(
            f"{role} {spec!r} is not a local folder and could not be loaded from the Hugging Face hub "
            f"(offline, or not in the cache: {reason}); download it or pass a local folder with {flag} PATH"
        ) from err
    return ResolvedModel(spec, folder, Path(folder).name)


_MODEL_REMEDY = "restore the file or download the model again"


def _index(folder: Path) -> dict[str, Any]:
    file = folder / "model_index.json"
    return read_json_object(file, _MODEL_REMEDY) if file.is_file() else {}


def decoder_kind(folder: Path) -> str:
    """`kandinsky22` (unet/ movq/ scheduler/) or `karlo` (text_proj/ decoder/ super_res_*), from the layout."""
    if all((folder / d).is_dir() for d in ("unet", "movq", "scheduler")):
        return "kandinsky22"
    if all((folder / d).is_dir() for d in ("text_proj", "decoder", "super_res_first", "super_res_last")):
        return "karlo"
    raise ConfigError(
        f"{folder} is neither a Kandinsky v2.2 decoder folder (unet/ movq/ scheduler/) nor a Karlo folder "
        f"(text_proj/ decoder/ super_res_first/ super_res_last/ ...)"
    )


def _load_scheduler(folder: Path) -> Any:
    """A scheduler by the diffusers class its config names (diffusers classes only)."""
    import diffusers

    config = read_json_object(folder / "scheduler_config.json", _MODEL_REMEDY)
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise ConfigError(f"{folder}: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_pretrained(folder)


def load_any_prior(folder: Path, dtype: torch.dtype, local_files_only: bool | None) -> tuple[Any, Any]:
    """(prior, prior_scheduler): our EclipsePrior/DiffusionPrior, or an original diffusers PriorTransformer.

    A folder whose model_index.json names a PriorTransformer `prior` (kandinsky-community/kandinsky-2-2-prior,
    kakaobrain/karlo-v1-alpha) is the original diffusion prior; it comes with its UnCLIPScheduler.
    """
    entry = _index(folder).get("prior") or [None, None]
    if isinstance(entry, list) and entry[1:2] == ["PriorTransformer"]:
        from diffusers import PriorTransformer

        prior = load_weights(PriorTransformer, folder / "prior", dtype)
        for name in ("prior_scheduler", "scheduler"):
            if (folder / name / "scheduler_config.json").is_file():
                return prior, _load_scheduler(folder / name)
        raise ConfigError(f"{folder} has a PriorTransformer but no scheduler/ or prior_scheduler/ folder")
    from eclipse_prior.models.loading import load_prior

    return load_prior(folder, local_files_only=local_files_only, torch_dtype=dtype), None


@dataclass
class LoadedPipeline:
    """A ready pipeline plus what the sidecars must record about how it was built."""

    pipe: Any
    kind: str
    models: dict[str, ResolvedModel | None]
    prior_class: str
    device: str
    dtype: str
    free_text_models: bool = False


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available else cpu; an unavailable cuda is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def load_pipeline(
    prior: str | None,
    decoder: str,
    clip: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    offload: str = "none",
    free_text_models: bool = False,
    local_files_only: bool | None = None,
    revisions: dict[str, str | None] | None = None,
) -> LoadedPipeline:
    """Build an Eclipse Kandinsky/Karlo pipeline from a prior, a decoder and (if needed) a CLIP, by id or path.

    `decoder` is `kandinsky22`, `karlo`, a hub id or a folder (Kandinsky 2.2 or Karlo layout); `prior` and
    `clip` default to the preset's hub ids. `revisions` pins hub revisions (regeneration from a sidecar).
    """
    from eclipse_prior.pipelines.kandinsky import EclipseKandinskyV22Pipeline
    from eclipse_prior.pipelines.karlo import EclipseKarloPipeline

    device = resolve_device(device)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device == "cpu":
        raise ConfigError(
            "--dtype fp16 needs a CUDA GPU (half precision is not supported well on CPU); use fp32 or bf16"
        )
    check_offload(offload)
    torch_dtype = DTYPES[dtype]
    revisions = revisions or {}
    preset = DECODERS.get(decoder)
    dec = resolve_model(
        preset.repo if preset else decoder, "decoder", revisions.get("decoder"), local_files_only
    )
    dec.id = decoder
    dec_folder = Path(dec.path)
    kind = decoder_kind(dec_folder)
    prior_spec = prior or (preset.prior if preset else None)
    if prior_spec is None:
        raise ConfigError(
            "--prior is required with a decoder folder (a run dir, an export folder or a hub id)"
        )
    clip_spec = clip or (preset.clip if preset else None)
    if kind == "kandinsky22" and clip_spec is None and not (dec_folder / "text_encoder").is_dir():
        raise ConfigError(
            f"the decoder folder {dec_folder} has no text encoder: pass the CLIP with --clip ID_OR_PATH"
        )
    clip_model = (
        resolve_model(clip_spec, "clip", revisions.get("clip"), local_files_only) if clip_spec else None
    )
    pri = resolve_model(prior_spec, "prior", revisions.get("prior"), local_files_only)
    prior_model, prior_scheduler = load_any_prior(Path(pri.path), torch_dtype, local_files_only)

    text: dict[str, Any] = {}
    if clip_model is not None:
        from eclipse_prior.encoders.clip import load_clip

        bundle = load_clip(
            clip_model.path, dtype=torch_dtype, vision=kind == "kandinsky22", local_files_only=True
        )
        text = {"text_encoder": bundle.text_model, "tokenizer": bundle.tokenizer}
        if kind == "kandinsky22":
            text.update(image_encoder=bundle.vision_model, image_processor=bundle.image_processor)
    else:  # the text encoder ships in the decoder folder (Karlo, or a saved Eclipse pipeline)
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        text = {
            "text_encoder": load_weights(
                CLIPTextModelWithProjection, dec_folder / "text_encoder", torch_dtype
            ),
            "tokenizer": AutoTokenizer.from_pretrained(dec_folder / "tokenizer"),
        }
        if kind == "kandinsky22" and (dec_folder / "image_encoder").is_dir():
            text["image_encoder"] = load_weights(
                CLIPVisionModelWithProjection, dec_folder / "image_encoder", torch_dtype
            )
    if kind == "kandinsky22":
        from diffusers import UNet2DConditionModel, VQModel

        pipe = EclipseKandinskyV22Pipeline(
            prior=prior_model,
            unet=load_weights(UNet2DConditionModel, dec_folder / "unet", torch_dtype),
            movq=load_weights(VQModel, dec_folder / "movq", torch_dtype),
            scheduler=_load_scheduler(dec_folder / "scheduler"),
            prior_scheduler=prior_scheduler,
            **text,
        )
    else:
        from diffusers import UNet2DConditionModel, UNet2DModel
        from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel

        # Components loaded one by one: UnCLIPPipeline.from_pretrained fails in diffusers 0.42 (see karlo.py).
        pipe = EclipseKarloPipeline(
            prior=prior_model,
            text_proj=load_weights(UnCLIPTextProjModel, dec_folder / "text_proj", torch_dtype),
            decoder=load_weights(UNet2DConditionModel, dec_folder / "decoder", torch_dtype),
            super_res_first=load_weights(UNet2DModel, dec_folder / "super_res_first", torch_dtype),
            super_res_last=load_weights(UNet2DModel, dec_folder / "super_res_last", torch_dtype),
            decoder_scheduler=_load_scheduler(dec_folder / "decoder_scheduler"),
            super_res_scheduler=_load_scheduler(dec_folder / "super_res_scheduler"),
            prior_scheduler=prior_scheduler,
            **text,
        )
    if offload in (None, "none"):
        pipe.to(device)
    else:
        pipe.enable_offload(offload)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(
        pipe,
        kind,
        {"prior": pri, "decoder": dec, "clip": clip_model},
        type(prior_model).__name__,
        device,
        dtype,
        free_text_models,
    )


@dataclass
class GenerationSettings:
    """Decoder and prior settings shared by the images of one run (None: the decoder's paper default)."""

    steps: int | None = None
    guidance: float | None = None
    prior_steps: int = 25
    prior_guidance: float = 4.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    super_res_steps: int = 7  # Karlo only

    def resolved(self, loaded: LoadedPipeline) -> GenerationSettings:
        """Fill the decoder defaults (Kandinsky: 50 steps, 7.5, 512 px; Karlo: 25 steps, 8.0, fixed size)."""
        preset = DECODERS[loaded.kind]
        out = GenerationSettings(**asdict(self))
        out.steps = preset.steps if self.steps is None else self.steps
        out.guidance = preset.guidance if self.guidance is None else self.guidance
        if loaded.kind == "karlo":
            size = loaded.pipe.image_size
            for name in ("height", "width"):
                if getattr(self, name) not in (None, size):
                    raise ConfigError(f"Karlo decodes at a fixed {size}x{size}; --{name} cannot change it")
            out.height = out.width = size
        else:
            out.height = self.height or KANDINSKY_SIZE
            out.width = self.width or KANDINSKY_SIZE
            # the decoder rounds other sizes up (50 -> 52 on the tiny decoder, 500 -> 512 on the real one), which
            # would make the sidecar's size wrong: refuse them
            multiple = kandinsky_size_multiple(loaded.pipe.movq)
            for name in ("height", "width"):
                value = getattr(out, name)
                if value < 1 or value % multiple:
                    raise ConfigError(
                        f"--{name} {value} is not a positive multiple of {multiple} (this decoder's latent scale "
                        f"squared); use e.g. {max(multiple, round(value / multiple) * multiple)}"
                    )
            check_kandinsky_size(loaded.pipe.unet, loaded.pipe.movq, out.height, out.width, loaded.device,
                                 DTYPES.get(loaded.dtype, torch.float32))
        check_generation_numbers(out.steps, out.prior_steps, out.super_res_steps)
        check_guidance(guidance=out.guidance, prior_guidance=out.prior_guidance)
        return out


# Sides up to this many times the decoder's training size: Kandinsky 2.2 is used up to about 2x its native size;
# further, its UNet has never seen such a layout and its attention maps grow with the fourth power of the side.
MAX_SIZE_FACTOR = 2


def kandinsky_native_size(unet: Any, movq: Any) -> int | None:
    """The image side the decoder was built for: the UNet's latent sample_size times the MoVQ scale (None if unset)."""
    sample = unet.config.sample_size
    if isinstance(sample, list | tuple):
        sample = max(sample) if sample else None
    if not isinstance(sample, int) or sample < 1:
        return None
    return sample * 2 ** (len(movq.config.block_out_channels) - 1)


def decode_memory_estimate(unet: Any, movq: Any, height: int, width: int, dtype: torch.dtype) -> int:
    """Bytes of the largest attention map a decode builds (UNet with guidance: batch 2; MoVQ's latent-resolution
    attention: batch 1), if attention is not computed in tiles. A rough bound, for the refusal message."""
    scale = 2 ** (len(movq.config.block_out_channels) - 1)
    latent = (height // scale) * (width // scale)
    size = torch.finfo(dtype).bits // 8
    head_dim = unet.config.attention_head_dim
    largest = latent * latent * 4  # MoVQ decoder's mid-block attention: one head, float32
    for level, (block, channels) in enumerate(zip(unet.config.down_block_types, unet.config.block_out_channels,
                                                  strict=False)):
        if "Attn" in block:
            dim = head_dim[level] if isinstance(head_dim, list | tuple) else head_dim
            heads = max(1, channels // int(dim or channels))
            tokens = latent // 4**level
            largest = max(largest, 2 * heads * tokens * tokens * size)
    return largest


def check_kandinsky_size(unet: Any, movq: Any, height: int, width: int, device: str, dtype: torch.dtype) -> None:
    """One line instead of an out-of-memory kill: sizes beyond MAX_SIZE_FACTOR x the decoder's native size, or whose
    attention maps would not fit the memory that is free, are refused with the estimate."""
    from eclipse_prior.resources import available_memory, gib

    need = decode_memory_estimate(unet, movq, height, width, dtype)
    estimate = f"a {height}x{width} decode needs about {gib(need)} for its largest attention map"
    native = kandinsky_native_size(unet, movq)
    if native is not None and max(height, width) > MAX_SIZE_FACTOR * native:
        raise ConfigError(
            f"--height {height} --width {width} is beyond what this decoder supports: it was built for {native}x{native} "
            f"(UNet sample_size x MoVQ scale) and sides up to {MAX_SIZE_FACTOR * native} are allowed; {estimate}"
        )
    free = available_memory(device)
    if free is not None and need > free:
        raise ConfigError(
            f"--height {height} --width {width} would not fit: {estimate} but {gib(free)} is free on "
            f"{device}; choose a smaller size"
        )


def kandinsky_size_multiple(movq: Any) -> int:
    """Image sizes the Kandinsky 2.2 decoder makes exactly: multiples of movq_scale_factor**2 (64 for the real one)."""
    scale = 2 ** (len(movq.config.block_out_channels) - 1)
    return scale * scale


def check_generation_numbers(
    steps: int | None = None,
    prior_steps: int | None = None,
    super_res_steps: int | None = None,
    num_images: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> None:
    """One-line errors for counts and sizes that cannot work; cheap, so the CLI runs it before loading models."""
    named = {"--steps": steps, "--prior-steps": prior_steps, "--super-res-steps": super_res_steps,
             "--num-images": num_images, "--height": height, "--width": width}
    for flag, value in named.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


def check_images_fit(count: int, height: int, width: int) -> None:
    """A run keeps its images in memory for the grid (and the grid itself): refuse counts that cannot fit, with the
    estimate, instead of being killed after hours of decoding."""
    from eclipse_prior.resources import available_memory, gib

    need = 2 * count * height * width * 3  # RGB images + the grid of them
    free = available_memory("cpu")
    if free is not None and need > free:
        raise ConfigError(
            f"{count} images of {height}x{width} need about {gib(need)} in memory (images and grid) but {gib(free)} is "
            "free; lower --num-images or split the prompts over several runs"
        )


def check_seed(seed: int, count: int = 1) -> None:
    """Image k gets seed + k: all of them must be valid 64-bit generator seeds."""
    if not (isinstance(seed, int) and 0 <= seed and seed + count <= 2**63):
        raise ConfigError(f"--seed must be an integer in [0, 2**63 - {count}], got {seed!r}")


def check_guidance(**scales: float | None) -> None:
    """Guidance scales must be finite and not negative (nan would silently make black or noise images)."""
    import math

    for name, value in scales.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import eclipse_prior

    return {
        "eclipse_prior": eclipse_prior.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _sidecar(loaded: LoadedPipeline, settings: GenerationSettings, prompt: str, seed: int) -> dict[str, Any]:
    models = {
        role: None
        if m is None
        else {"id": m.id, "path": m.path, "revision": m.revision, "weights_sha256": m.weights}
        for role, m in loaded.models.items()
    }
    models["prior"]["class"] = loaded.prior_class
    return {
        "format": SIDECAR_FORMAT,
        "prompt": prompt,
        "seed": seed,
        "decoder_kind": loaded.kind,
        "models": models,
        **asdict(settings),
        "dtype": loaded.dtype,
        "device": loaded.device,
        "versions": _versions(),
    }


def generate_batch(
    loaded: LoadedPipeline,
    requests: Sequence[tuple[str, int]],
    settings: GenerationSettings | None = None,
    progress: bool = False,
) -> list[tuple[Image.Image, dict[str, Any]]]:
    """One image per (prompt, seed), each with its sidecar dict (not written anywhere).

    With `free_text_models` all prior embeddings are made first, then the prior and text encoder are freed and
    the images decoded; each image keeps its own generator, so the pixels are the same either way. The
    progress bar counts prompts.
    """
    from eclipse_prior.outputs import progress as progress_bar

    settings = (settings or GenerationSettings()).resolved(loaded)
    pipe = loaded.pipe
    prompts = list(dict.fromkeys(p for p, _ in requests))
    for text in [*prompts, *([settings.negative_prompt] if settings.negative_prompt else [])]:
        report_truncation(getattr(pipe, "tokenizer", None), text)
    bar = progress_bar(total=len(prompts), unit="prompt", enabled=progress, desc="generate")
    remaining = {p: sum(q == p for q, _ in requests) for p in prompts}
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for _, seed in requests]

    def embed(i: int) -> Any:
        return pipe.prepare_embeds(
            requests[i][0],
            settings.negative_prompt,
            generators[i],
            settings.prior_steps,
            settings.prior_guidance,
        )

    def decode(i: int, embeds: Any) -> Image.Image:
        image = _decode(loaded, embeds, generators[i], settings)
        remaining[requests[i][0]] -= 1
        if remaining[requests[i][0]] == 0:
            bar.update(1)
        return image

    if loaded.free_text_models:
        all_embeds = [embed(i) for i in range(len(requests))]
        pipe.free_text_models()
        images = [decode(i, e) for i, e in enumerate(all_embeds)]
    else:  # decode right away: one embedding in memory at a time
        images = [decode(i, embed(i)) for i in range(len(requests))]
    bar.close()
    return [
        (image, _sidecar(loaded, settings, prompt, int(seed)))
        for image, (prompt, seed) in zip(images, requests, strict=True)
    ]


def truncated_text(tokenizer: Any, prompt: str) -> str | None:
    """The part of `prompt` the text encoder never sees (past the tokenizer's max length), or None."""
    from eclipse_prior.encoders._hf import quiet_transformers

    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return None
    with quiet_transformers():  # it warns about the length we are measuring
        ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= limit:
        return None
    return tokenizer.decode(ids[limit - 1 : -1])  # what truncation drops: all but the kept tokens and the end token


def report_truncation(tokenizer: Any, prompt: str) -> None:
    """Say what was cut from a long prompt, as the authors' pipeline does (the image ignores that part)."""
    cut = truncated_text(tokenizer, prompt)
    if cut is not None:
        print(f"note: the prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is longer than the text "
              f"encoder's {tokenizer.model_max_length} tokens; this part was cut: {cut!r}", file=sys.stderr)


def _decode(loaded: LoadedPipeline, embeds: Any, gen: torch.Generator, s: GenerationSettings) -> Image.Image:
    if loaded.kind == "karlo":
        return loaded.pipe.decode(embeds, gen, s.steps, s.guidance, s.super_res_steps)[0]
    return loaded.pipe.decode(embeds, gen, s.steps, s.guidance, s.height, s.width)[0]


def generate_images(
    loaded: LoadedPipeline, prompt: str, seeds: Sequence[int], settings: GenerationSettings | None = None
) -> list[tuple[Image.Image, dict[str, Any]]]:
    """Images of one prompt, one per seed, each with its sidecar dict (nothing written)."""
    return generate_batch(loaded, [(prompt, int(s)) for s in seeds], settings)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written outputs."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_image(image: Image.Image, sidecar: dict[str, Any], png: Path) -> Path:
    """Write the PNG and its JSON sidecar (same stem) and return the PNG path."""
    png.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {**sidecar, "image": png.name}
    _atomic_write(png, lambda tmp: image.save(tmp, format="PNG"))
    _atomic_write(
        png.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n")
    )
    return png


def make_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images in rows of `columns` (one row per prompt), on a black canvas."""
    columns = max(1, min(columns, len(images)))
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with '#' are skipped."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompts file not found: {file}")
    try:
        text = file.read_bytes().decode("utf-8-sig")  # a BOM from Windows editors is not part of the first prompt
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompts file {file} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {file} holds no prompts")
    return prompts


@dataclass
class RunResult:
    """Paths written by `run_generation`."""

    images: list[Path] = field(default_factory=list)
    grid: Path | None = None


def run_generation(
    loaded: LoadedPipeline,
    prompts: Sequence[str],
    out: str | Path,
    num_images: int = 1,
    seed: int = 0,
    settings: GenerationSettings | None = None,
    grid_name: str = "grid",
    progress: bool = True,
) -> RunResult:
    """Generate `num_images` per prompt; image k (over the whole run) gets seed `seed + k`.

    Writes `NNNNN-<prompt>-s<seed>.png` + `.json` sidecars and `<grid_name>.png` (one row per prompt).
    """
    check_generation_numbers(num_images=num_images)
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    size = settings or GenerationSettings()
    check_images_fit(len(prompts) * num_images, size.height or KANDINSKY_SIZE, size.width or KANDINSKY_SIZE)
    out = Path(out)
    requests = [(p, seed + i * num_images + j) for i, p in enumerate(prompts) for j in range(num_images)]
    results = generate_batch(loaded, requests, settings, progress=progress)
    written = RunResult()
    for k, ((image, sidecar), (prompt, s)) in enumerate(zip(results, requests, strict=True)):
        written.images.append(save_image(image, sidecar, out / f"{k:05d}-{_slug(prompt)}-s{s}.png"))
    grid_path = out / f"{grid_name}.png"
    grid = make_grid([image for image, _ in results], num_images)
    _atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    written.grid = grid_path
    return written


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A sidecar written by `save_image`; anything else is a one-line error."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sidecar not found: {file}")
    data = read_json_object(file, "regenerate from the image's prompt instead")
    if data.get("format") != SIDECAR_FORMAT:
        raise ConfigError(f"{file} is not an eclipse-prior image sidecar (format {SIDECAR_FORMAT})")
    check_sidecar(data, file)
    return data


def check_sidecar(data: dict[str, Any], file: Path) -> None:
    """Every field regeneration reads must have its type (a hand-edited sidecar is one line naming the field)."""
    from eclipse_prior.config import config_from_mapping

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{file}: field {field} must be {what}, got {data.get(field)!r}"
                              if "." not in field else f"{file}: field {field} must be {what}")

    need(isinstance(data.get("prompt"), str), "prompt", "a string")
    seed = data.get("seed")
    need(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63, "seed",
         "an integer in [0, 2**63)")
    need(data.get("dtype") in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
    need(isinstance(data.get("device"), str), "device", "a string")
    models = data.get("models")
    need(isinstance(models, dict), "models", "an object with prior, decoder and clip entries")
    for role in ("prior", "decoder", "clip"):
        entry = models.get(role)
        if entry is None and role == "clip":
            continue
        need(isinstance(entry, dict), f"models.{role}", "an object")
        need(isinstance(entry.get("id"), str), f"models.{role}.id", "a string")
        for key in ("path", "revision"):
            need(entry.get(key) is None or isinstance(entry.get(key), str), f"models.{role}.{key}", "a string or null")
        digests = entry.get("weights_sha256")
        need(digests is None or isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values()),
             f"models.{role}.weights_sha256", "an object of file: sha256")
    names = {f.name for f in GenerationSettings.__dataclass_fields__.values()}
    try:
        config_from_mapping(GenerationSettings, {k: data[k] for k in names if k in data}, str(file))
    except ConfigError as err:
        raise ConfigError(f"{file}: field {err}") from None


def _model_spec(entry: dict[str, Any] | None) -> str | None:
    """Hub models by id (their revision is pinned separately); local ones by the folder recorded."""
    if entry is None:
        return None
    if entry.get("revision") is None and entry.get("path") and Path(entry["path"]).is_dir():
        return entry["path"]
    return entry["id"]


def _check_weights(role: str, entry: dict[str, Any], model: ResolvedModel, allow: bool) -> None:
    recorded, current = entry.get("weights_sha256"), model.weights
    if recorded is None or current is None or recorded == current:
        return
    files = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    what = f"{role} {entry['id']!r}: its weights changed since the image was made ({shown}), so the image would differ"
    if not allow:
        raise ConfigError(f"{what}; pass --allow-changed-weights to regenerate with the current weights anyway")
    print(f"warning: {what}; regenerating with the current weights (--allow-changed-weights)", file=sys.stderr)


def regenerate(
    sidecar_path: str | Path,
    out: str | Path | None = None,
    device: str | None = None,
    local_files_only: bool | None = None,
    allow_changed_weights: bool = False,
) -> Path:
    """Re-make the image a sidecar describes (same models and revisions, settings, seed) and write it.

    The result goes to `out` (default: beside the sidecar, stem + `-regen`); pixel-equal to the original when
    run on the same kind of machine with the versions the sidecar records. A local model whose weight files no
    longer match the sidecar's sha256 (e.g. a run dir that trained on) is a one-line error, or with
    `allow_changed_weights` a warning.
    """
    data = read_sidecar(sidecar_path)
    models = data["models"]
    loaded = load_pipeline(
        _model_spec(models["prior"]),
        _model_spec(models["decoder"]),
        _model_spec(models.get("clip")),
        device=device or data["device"],
        dtype=data["dtype"],
        local_files_only=local_files_only,
        revisions={role: (m or {}).get("revision") for role, m in models.items()},
    )
    # Record the original ids, not the folders they were found in.
    for role, entry in models.items():
        if entry is not None and loaded.models.get(role) is not None:
            loaded.models[role].id = entry["id"]
            _check_weights(role, entry, loaded.models[role], allow_changed_weights)
    names = {f.name for f in GenerationSettings.__dataclass_fields__.values()}
    settings = GenerationSettings(**{k: data[k] for k in names if k in data})
    ((image, sidecar),) = generate_batch(loaded, [(data["prompt"], int(data["seed"]))], settings)
    src = Path(sidecar_path)
    target = Path(out) / src.with_suffix(".png").name if out else src.with_name(f"{src.stem}-regen.png")
    return save_image(image, sidecar, target)

"""Load a transformers CLIP (text + vision towers, tokenizer, image processor) from a hub id or a local folder.

Two layouts are accepted because both are how CLIP ships for unCLIP: a full ``CLIPModel`` folder (what
``CLIPModel.save_pretrained`` writes, e.g. ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``) and the Kandinsky prior
layout with ``text_encoder/ tokenizer/ image_encoder/ image_processor/`` subfolders. Weights load through
transformers from safetensors only (a folder holding only a pickle is refused, never unpickled), never with
``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eclipse_prior.encoders._hf import hub_resolves, looks_like_hub_id, offline_default, quiet_transformers
from eclipse_prior.errors import ModelNotFoundError

SUBFOLDERS = {
    "text": "text_encoder",
    "tokenizer": "tokenizer",
    "vision": "image_encoder",
    "processor": "image_processor",
}


def tokenize(tokenizer: Any, captions: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded to max_length, plus ``truncated`` (B,) for over-long captions.

    A free function (not a method) so data-loader workers can tokenize with just the picklable tokenizer.
    """
    captions = list(captions)
    full = tokenizer(captions, truncation=False, verbose=False)["input_ids"]
    enc = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    truncated = torch.tensor([len(ids) > max_length for ids in full], dtype=torch.bool)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "truncated": truncated}


@dataclass
class ClipBundle:
    """The pieces of one CLIP model that embedding, training and generation need, with its provenance."""

    tokenizer: Any
    text_model: Any  # CLIPTextModelWithProjection or None
    vision_model: Any  # CLIPVisionModelWithProjection or None
    image_processor: Any
    name: str
    revision: str
    embed_dim: int
    max_length: int
    device: torch.device
    dtype: torch.dtype

    @property
    def text_state_dim(self) -> int:
        """Width D of the per-token text states (last_hidden_state)."""
        return int(self.text_model.config.hidden_size)

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize padded to ``max_length``; ``truncated`` marks captions longer than the model's context."""
        return tokenize(self.tokenizer, captions, self.max_length)

    @torch.inference_mode()
    def encode_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_states: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Encode already tokenized text (lets data loaders tokenize in worker processes)."""
        if self.text_model is None:
            raise ModelNotFoundError(f"CLIP {self.name!r} was loaded without its text encoder (text=False)")
        out = self.text_model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return {
            "text_embeds": out.text_embeds,
            "text_states": out.last_hidden_state if with_states else None,
            "text_mask": attention_mask.to(self.device).bool() if with_states else None,
        }

    def encode_text(
        self, captions: Sequence[str], with_states: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Pooled projected ``text_embeds`` (B, E); with_states adds last_hidden_state (B, L, D) and its mask.

        Tensors stay on the bundle's device in its dtype; ``truncated`` (B,) bool says which captions were cut.
        """
        tok = self.tokenize(captions)
        out = self.encode_tokens(tok["input_ids"], tok["attention_mask"], with_states)
        out["truncated"] = tok["truncated"]
        return out

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize/crop/normalise PIL images into pixel values with the model's own image processor."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) projected image embeddings of preprocessed pixels: what unCLIP decoders expect."""
        if self.vision_model is None:
            raise ModelNotFoundError(
                f"CLIP {self.name!r} was loaded without its image encoder (vision=False)"
            )
        out = self.vision_model(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.image_embeds

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Raw (unnormalised) image_embeds (B, E) of PIL images."""
        return self.encode_pixels(self.preprocess_images(images))


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def _check_local_folder(folder: Path, parts: list[str], subfolders: bool) -> None:
    """A local CLIP folder must hold readable JSON configs and safetensors weights (never a pickle to unpickle)."""
    for part in parts:
        where = folder / SUBFOLDERS[part] if subfolders else folder
        config = where / ("preprocessor_config.json" if part == "processor" else "config.json")
        if config.exists():
            try:
                if not config.is_file():  # a FIFO would block the read
                    raise ValueError("not a regular file")
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ModelNotFoundError(
                    f"CLIP folder {folder}: {config.relative_to(folder)} is damaged ({str(err).splitlines()[0]}); "
                    "re-download or re-save the model"
                ) from None
        if part != "processor" and not any((where / name).is_file() for name in SAFE_WEIGHTS):
            pickles = [name for name in PICKLE_WEIGHTS if (where / name).is_file()]
            held = f"only {', '.join(pickles)} (a pickle, which eclipse-prior never loads)" if pickles else "no weights"
            raise ModelNotFoundError(
                f"CLIP folder {where} holds {held}; it needs model.safetensors: convert it once with transformers "
                "(from_pretrained, then save_pretrained(..., safe_serialization=True)) in an environment you trust"
            )


def _file_errors() -> tuple[type[Exception], ...]:
    """What transformers' dependencies raise for a damaged model file (they derive from Exception only)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return SafetensorError, StrictDataclassError


def clip_fingerprint(name: str, revision: str) -> str:
    """A digest that changes when a local CLIP folder's files change (size, first and last MiB); for a hub id the
    id and commit. Cheap even for 10 GB weights; an embed resume checks it so one store never mixes two models."""
    folder = Path(os.path.expanduser(name))
    if not folder.is_dir():
        return hashlib.sha256(f"{name}@{revision}".encode()).hexdigest()
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()


def _is_local(id_or_path: str) -> bool:
    return os.path.isdir(id_or_path) or id_or_path.startswith((".", "/", "~"))


def _not_found(id_or_path: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load CLIP model {id_or_path!r} ({why}); pass a local folder instead (--clip /path/to/clip): "
        "a CLIPModel saved with save_pretrained plus tokenizer and image processor, or a Kandinsky prior folder "
        "with text_encoder/ tokenizer/ image_encoder/ image_processor/"
    )


def _hub_layout(repo_id: str, local_files_only: bool) -> tuple[bool, bool]:
    """(subfolder layout?, load from cache only?) for a hub id, asking the network at most once.

    The cache is tried first so a downloaded model loads offline without retries; an unreachable hub or an unknown
    repo becomes one ModelNotFoundError instead of a fall-through to a second, equally failing request.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    for name, subfolders in (("config.json", False), ("model_index.json", True)):
        try:
            hf_hub_download(repo_id, name, local_files_only=True)
            return subfolders, True
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
    if local_files_only:
        raise _not_found(repo_id, "not in the local cache and offline")
    if not hub_resolves():
        raise _not_found(repo_id, "the model hub is unreachable and the model is not cached")
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # no retry chatter: the outcome is reported as one line
    try:
        hf_hub_download(repo_id, "model_index.json")
        return True, False
    except LocalEntryNotFoundError as err:  # the hub could not be reached
        raise _not_found(repo_id, "the model hub is unreachable and the model is not cached") from err
    except EntryNotFoundError:  # a plain CLIPModel repo
        return False, False
    except Exception as err:  # unknown repo, gated, ...
        raise _not_found(repo_id, type(err).__name__) from err
    finally:
        hub_logging.set_verbosity(level)


def _hub_commit(repo_id: str, subfolders: bool) -> str:
    """The commit of the cached snapshot that was loaded (its folder name under ``snapshots/``)."""
    from huggingface_hub import hf_hub_download

    filename = f"{SUBFOLDERS['text']}/config.json" if subfolders else "config.json"
    try:
        parts = Path(hf_hub_download(repo_id, filename, local_files_only=True)).parts
    except Exception:  # cache layout not as expected: provenance unknown rather than wrong
        return "unknown"
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else "unknown"


def load_clip(
    id_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text: bool = True,
    vision: bool = True,
    local_files_only: bool | None = None,
) -> ClipBundle:
    """Load CLIP towers in eval mode; a model that is missing (or unreachable offline) is a one-line error."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        CLIPConfig,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    name = str(id_or_path)
    local = _is_local(os.path.expanduser(name))
    if local:
        name = os.path.expanduser(name)
        if not os.path.isdir(name):
            raise _not_found(name, "no such folder")
    elif not looks_like_hub_id(name):  # a mistyped folder name: never worth a trip to the hub
        raise _not_found(name, "no such folder, nor a hub id owner/name")
    if local_files_only is None:
        local_files_only = offline_default()
    if local:
        subfolders = (Path(name) / SUBFOLDERS["text"] / "config.json").is_file()
        parts = (["text"] if text else []) + (["vision", "processor"] if vision else [])
        _check_local_folder(Path(name), parts, subfolders)
    else:
        subfolders, local_files_only = _hub_layout(name, local_files_only)
    kw: dict[str, Any] = {"local_files_only": local_files_only}
    weights_kw = {"use_safetensors": True}  # never fall back to unpickling pytorch_model.bin

    def sub(part: str) -> dict[str, Any]:
        return {"subfolder": SUBFOLDERS[part]} if subfolders else {}

    try:
        with quiet_transformers():
            if subfolders:
                text_cfg = CLIPTextConfig.from_pretrained(name, **sub("text"), **kw)
                vision_cfg = CLIPVisionConfig.from_pretrained(name, **sub("vision"), **kw) if vision else None
            else:
                # the towers' own configs inside a CLIPModel config may lack projection_dim: take the top-level one
                full = CLIPConfig.from_pretrained(name, **kw)
                text_cfg, vision_cfg = full.text_config, full.vision_config
                text_cfg.projection_dim = vision_cfg.projection_dim = full.projection_dim
            tokenizer = AutoTokenizer.from_pretrained(name, **sub("tokenizer"), **kw) if text else None
            text_model = (
                CLIPTextModelWithProjection.from_pretrained(
                    name, config=text_cfg, **sub("text"), **kw, **weights_kw
                )
                if text
                else None
            )
            vision_model = (
                CLIPVisionModelWithProjection.from_pretrained(
                    name, config=vision_cfg, **sub("vision"), **kw, **weights_kw
                )
                if vision
                else None
            )
            processor = AutoImageProcessor.from_pretrained(name, **sub("processor"), **kw) if vision else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, *_file_errors()) as err:
        # a damaged or mismatched file of the model: one line naming it, not a traceback from inside transformers
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        if local:
            raise ModelNotFoundError(f"CLIP folder {name} cannot be loaded ({why[:300]})") from err
        raise _not_found(name, why) from err

    models = [m for m in (text_model, vision_model) if m is not None]
    for m in models:
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    embed_dim = int(text_cfg.projection_dim)
    max_pos = int(text_cfg.max_position_embeddings)
    tok_max = (
        int(getattr(tokenizer, "model_max_length", max_pos) or max_pos) if tokenizer is not None else max_pos
    )
    return ClipBundle(
        tokenizer=tokenizer,
        text_model=text_model,
        vision_model=vision_model,
        image_processor=processor,
        name=str(id_or_path),
        revision="local" if local else _hub_commit(name, subfolders),
        embed_dim=embed_dim,
        max_length=min(tok_max, max_pos),
        device=torch.device(device),
        dtype=dtype,
    )

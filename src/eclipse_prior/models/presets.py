"""Named network sizes. A preset fixes depth and heads; width and text length usually come from the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eclipse_prior.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """Depth/heads of a network plus default (or, for released sizes, fixed) width and text length."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    embedding_dim: int
    num_embeddings: int
    fixed_width: bool = False


PRESETS: dict[str, Preset] = {
    # The released ECLIPSE checkpoints (CLIP ViT-bigG-14 for Kandinsky v2.2, ViT-L/14 for Karlo).
    "kandinsky22": Preset(10, 16, 32, 1280, 77, fixed_width=True),
    "karlo": Preset(10, 16, 32, 768, 77, fixed_width=True),
    # The shapes world (its CLIP: width 64, 24 text positions): ~1.2M parameters, trains in minutes on a CPU.
    "small": Preset(6, 4, 32, 64, 24),
    # Unit tests: ~100k parameters.
    "tiny": Preset(2, 2, 32, 32, 8),
}


def resolve_preset(
    name: str, embedding_dim: int | None = None, num_embeddings: int | None = None, pooled_only: bool = False
) -> dict[str, Any]:
    """Return the network config fields shared by both prior classes for a preset.

    `pooled_only` drops the per-token text states (num_embeddings 0, no text-state projection).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if embedding_dim is not None and p.fixed_width and embedding_dim != p.embedding_dim:
        raise ConfigError(
            f"preset {name!r} has embedding width {p.embedding_dim} but the data has width {embedding_dim}; "
            f"use a preset without a fixed width (small, tiny) or data from the matching CLIP"
        )
    width = embedding_dim if embedding_dim is not None else p.embedding_dim
    length = num_embeddings if num_embeddings is not None else p.num_embeddings
    if width <= 0 or length < 0:
        raise ConfigError(f"embedding width must be positive and text length non-negative, got {width}, {length}")
    if pooled_only:
        length = 0
    return {
        "num_attention_heads": p.num_attention_heads,
        "attention_head_dim": p.attention_head_dim,
        "num_layers": p.num_layers,
        "embedding_dim": width,
        "num_embeddings": length,
        "encoder_hid_proj_type": None if pooled_only else "linear",
    }

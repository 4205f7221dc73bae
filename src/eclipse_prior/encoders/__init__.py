"""Frozen encoders (CLIP) used to embed data and prompts."""

from eclipse_prior.encoders.clip import ClipBundle, load_clip

__all__ = ["ClipBundle", "load_clip"]

"""Shared Hugging Face helpers: quiet model loading and fast failure when the hub cannot be reached.

Used by CLIP loading, the image-benchmark scorers, the pipelines and `load_prior`, so each says the same thing the
same way (one line) instead of printing retry chatter or expected loading warnings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide expected loading noise: per-model progress bars, the other CLIP tower's unexpected keys, and the
    "requires torchvision, falling back to the PIL image processor" notice (this project never uses torchvision).
    """
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def offline_default() -> bool:
    """Whether HF_HUB_OFFLINE asks for cache-only loading."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def hub_resolves() -> bool:
    """Whether the hub's host name resolves: without DNS, huggingface_hub would retry for about a minute."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def looks_like_hub_id(name: str) -> bool:
    """A hub model id is "owner/name" (exactly one slash, no path prefix)."""
    return name.count("/") == 1 and not name.startswith(("/", "./", "../", "~", "."))

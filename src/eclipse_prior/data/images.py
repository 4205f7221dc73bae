"""The one image decoder for user images: every place that reads a picture a user gave goes through ``decode_image``.

Why one decoder: images come from folders and tars nobody checked, so reading them must never block (a FIFO or a
device named ``x.jpg``), never blow up memory (a 100 kB PNG can declare 60000 x 60000 pixels), never silently
change the picture (EXIF rotation, 16-bit greyscale clipped to white, transparency over undefined colour), and
every refusal must carry a reason the caller can count. ``RejectedImage.reason`` is that reason.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_BYTES = 100 * 1024 * 1024  # an encoded image larger than this is not a photo worth decoding
DEFAULT_MAX_PIXELS = 64_000_000  # width x height, read from the header before any pixel is decoded
MAX_ASPECT_RATIO = 100  # 1 x 60M pixels passes the pixel cap but a shortest-edge resize would make it 224 x 13G
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (what viewers and browsers show)
# raster formats a photo dataset holds; nothing else is even identified (EPS would run Ghostscript on the file)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO) files

# skip reasons (the store manifest counts them under these names)
NOT_REGULAR_FILE = "not_regular_file"
MISSING_IMAGE = "missing_image"
FILE_TOO_LARGE = "image_file_too_large"
TOO_MANY_PIXELS = "image_too_many_pixels"
TRUNCATED_IMAGE = "truncated_image"
UNREADABLE_IMAGE = "unreadable_image"
UNSUPPORTED_MODE = "unsupported_image_mode"
EXTREME_ASPECT = "image_extreme_aspect_ratio"


class RejectedImage(Exception):
    """An image that cannot be used; ``reason`` is one of this module's skip reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, never opening anything else (a FIFO would block, a device never ends)."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise RejectedImage(MISSING_IMAGE, str(path)) from err
    except (OSError, ValueError) as err:  # ValueError: a NUL byte or an unencodable character in the name
        raise RejectedImage(UNREADABLE_IMAGE, f"{path!r}: {err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise RejectedImage(NOT_REGULAR_FILE, str(path))
    if info.st_size > max_bytes:
        raise RejectedImage(FILE_TOO_LARGE, f"{path}: {info.st_size} bytes")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, opening it still cannot block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise RejectedImage(UNREADABLE_IMAGE, f"{path}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RejectedImage(NOT_REGULAR_FILE, str(path))
        try:
            data = f.read(max_bytes + 1)
        except OSError as err:  # EIO from a failing disk, a file truncated while being read, ...
            raise RejectedImage(UNREADABLE_IMAGE, f"{path}: {err.strerror}") from err
    if len(data) > max_bytes:
        raise RejectedImage(FILE_TOO_LARGE, f"{path}: more than {max_bytes} bytes")
    return data


def decode_image(
    data: bytes | str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An RGB image from encoded bytes or a file path, upright (EXIF orientation applied), fully decoded.

    Raises RejectedImage (with a countable reason) for anything that is not a usable image.
    """
    if not isinstance(data, bytes):
        data = read_image_bytes(data, max_bytes)
    elif len(data) > max_bytes:
        raise RejectedImage(FILE_TOO_LARGE, f"{len(data)} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage(TOO_MANY_PIXELS, str(err)) from err
    except Exception as err:  # not an image PIL knows: every decoder failure means the same thing here
        raise RejectedImage(UNREADABLE_IMAGE, type(err).__name__) from err
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise RejectedImage(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels")
        if width < 1 or height < 1:
            raise RejectedImage(UNREADABLE_IMAGE, f"{width}x{height}")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise RejectedImage(EXTREME_ASPECT, f"{width}x{height}")
        try:
            im.load()
        except OSError as err:
            reason = TRUNCATED_IMAGE if "truncated" in str(err) else UNREADABLE_IMAGE
            raise RejectedImage(reason, str(err)) from err
        except Exception as err:  # decoders raise many types (SyntaxError, ValueError, ...) for bad data
            raise RejectedImage(UNREADABLE_IMAGE, type(err).__name__) from err
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # a damaged EXIF block: the pixels are still good, keep them as stored
            upright = im
        try:
            return to_rgb(upright)
        except RejectedImage:
            raise
        except Exception as err:  # a mode or layout PIL decoded but cannot convert
            raise RejectedImage(UNSUPPORTED_MODE, f"{upright.mode}: {type(err).__name__}") from err


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL mode to 8-bit RGB with the values meant, not PIL's clipping conversions.

    16-bit greyscale (I;16*, and I which is how 16-bit sources decode) scales 0..65535 to 0..255; F scales 0..1 when
    its values lie there (else clips 0..255); transparency (alpha, P/L with a transparent index) is composited on
    ``background``; CMYK, YCbCr, 1-bit and palettes go through PIL's colour conversions.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        grey = ((values + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("P", "PA", "L", "1") and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise RejectedImage(UNSUPPORTED_MODE, mode) from err


def open_user_image(path: str | Path, **limits: int) -> Image.Image:
    """``decode_image`` for one file a user named, for commands that stop rather than skip (one-line error)."""
    from eclipse_prior.errors import ConfigError

    try:
        return decode_image(path, **limits)
    except RejectedImage as err:
        raise ConfigError(f"{path}: cannot use this image ({err})") from None

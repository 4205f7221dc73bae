"""Reading the text files a dataset ships (captions.jsonl/csv, list files, sidecar captions, tar captions).

They are meant to be UTF-8, but files made on other systems arrive with a byte-order mark, as UTF-16, or in a
Windows code page. Decoding is therefore: BOM first (UTF-8/UTF-16/UTF-32), then strict UTF-8, and only then a
named fallback (cp1252, whose undefined bytes are taken as Latin-1) that is *reported* with the count of invalid
UTF-8 sequences, never a traceback and never a silent replacement character.
"""

from __future__ import annotations

import codecs
import os
import stat
from dataclasses import dataclass

from eclipse_prior.errors import ConfigError

FALLBACK_ENCODING = "cp1252"
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class DecodedText:
    """Decoded text, the encoding used, and how many invalid UTF-8 sequences forced the fallback (0 if none)."""

    text: str
    encoding: str
    invalid_utf8: int = 0

    @property
    def fell_back(self) -> bool:
        return self.invalid_utf8 > 0


def _cp1252_or_latin1(error: UnicodeDecodeError) -> tuple[str, int]:
    """cp1252 leaves five bytes undefined; read those as Latin-1 so every byte maps to some character."""
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("eclipse_prior_latin1", _cp1252_or_latin1)


def count_invalid_utf8(data: bytes) -> int:
    """Number of invalid UTF-8 sequences in ``data`` (what a replacing decoder turns into U+FFFD)."""
    return data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode())


def decode_text(data: bytes) -> DecodedText:
    """Decode bytes as described in the module docstring."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return DecodedText(data.decode(encoding), encoding)
            except UnicodeDecodeError:
                break  # a BOM followed by garbage: treat as unmarked bytes below
    try:
        return DecodedText(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode(FALLBACK_ENCODING, errors="eclipse_prior_latin1")
    return DecodedText(text, FALLBACK_ENCODING, count_invalid_utf8(data))


def read_text_file(path: str | os.PathLike, max_bytes: int | None = None) -> DecodedText:
    """Read and decode one text file; only regular files are opened (a FIFO would block).

    Over ``max_bytes`` or not a regular file: a one-line ConfigError naming the file.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ConfigError(f"{path} is {info.st_size} bytes, more than the {max_bytes} allowed for this file")
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ConfigError(f"{path} grew past {max_bytes} bytes while being read")
    return decode_text(data)


def encodable(text: str) -> str:
    """``text`` if it is valid Unicode, else with lone surrogates (undecodable file-name bytes, ``"\\ud800"`` JSON
    escapes) written as backslash escapes, so hashing, tokenizing and JSON never fail on it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

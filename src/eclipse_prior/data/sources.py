"""Image-text sources for ``embed``: an image folder, webdataset tar shards, or a clip-retrieval output folder.

A source is cut into *units* of work, each of which becomes exactly one store shard: fixed-size chunks of an image
folder or of a clip-retrieval part, or one whole tar. Units are fixed by the source alone (never by the number of
processes or by a previous run), which is what makes ``embed`` resumable and lets N processes produce the same
store as one. Bad input (unreadable image, empty caption, broken tar member, non-finite vector) is skipped and
counted under a reason, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eclipse_prior.errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
LIST_EXTS = (".txt", ".list", ".shards", ".urls")
FILE_KEYS = ("file", "filename", "image", "path", "filepath", "image_path")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")


@dataclass
class Record:
    """One candidate row: ``payload`` is decoded lazily (in a data-loader worker) by the source's ``decode``."""

    id: str
    caption: str
    source: str
    payload: Any = None
    bad: str | None = None  # a skip reason: the row could not even be read (e.g. a malformed captions line)


@dataclass
class Unit:
    """A slice of the source that becomes one store shard; ``size`` is the item count when known up front."""

    index: int
    label: str
    size: int | None
    args: tuple = ()
    skipped: Counter = field(default_factory=Counter)


class Source:
    """Base: ``units()`` lists the work, ``records(unit)`` yields candidate rows (counting what it skips)."""

    kind = "source"
    normalized = False  # True when the source supplies L2-normalised vectors (clip-retrieval)
    precomputed = False  # True when image embeddings come with the source instead of from CLIP

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        """Recorded in the store; local paths are made absolute so a resume from another directory matches."""
        spec = self.spec
        if not spec.startswith("pipe:") and "://" not in spec:
            spec = os.path.abspath(spec)
        return {"kind": self.kind, "spec": spec}

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def records(self, unit: Unit) -> Iterator[Record]:
        raise NotImplementedError


def load_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode fully (``load``) so truncated files fail here, in the worker, not later in the encoder."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()
        return im.convert("RGB")


def _clean(caption: Any) -> str:
    return caption.strip() if isinstance(caption, str) else ""


def _pick(row: dict[str, Any], keys: tuple[str, ...], what: str, where: Path) -> str:
    for k in keys:
        if k in row:
            return k
    raise ConfigError(f"{where}: no {what} column (looked for {', '.join(keys)})")


BAD_LINE = "\0bad line"  # marks a malformed captions line in ImageFolderSource.items (skipped and counted)


class ImageFolderSource(Source):
    """Images with captions from ``captions.jsonl``/``captions.csv`` (file + caption) or a ``.txt`` per image."""

    kind = "image_folder"

    def __init__(self, spec: str, shard_size: int) -> None:
        super().__init__(spec)
        self.root = Path(spec)
        self.shard_size = shard_size
        self.bad_lines: list[int] = []  # line numbers of malformed captions.jsonl/csv lines (skipped, counted)
        self.captions_file = ""
        self.items = self._list()

    def _list(self) -> list[tuple[str, str]]:
        """(relative file, caption) per row; a malformed captions line keeps its slot as ("", BAD_LINE)."""
        jsonl, csv_path = self.root / "captions.jsonl", self.root / "captions.csv"
        rows: list[tuple[int, dict[str, Any] | None]] = []  # (line number, row or None when malformed)
        if jsonl.is_file():
            for number, line in enumerate(jsonl.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    rows.append((number, row if isinstance(row, dict) else None))
        elif csv_path.is_file():
            with open(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    # a short row leaves fields None, a long one puts the excess under the key None
                    ok = None not in row and all(v is not None for v in row.values())
                    rows.append((reader.line_num, row if ok else None))
        else:
            images = sorted(
                p
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
            )
            out = []
            for p in images:
                txt = p.with_suffix(".txt")
                out.append((str(p.relative_to(self.root)), txt.read_text() if txt.is_file() else ""))
            return out
        where = jsonl if jsonl.is_file() else csv_path
        self.bad_lines = [number for number, row in rows if row is None]
        self.captions_file = where.name
        good = [row for _, row in rows if row is not None]
        if not good:
            return [("", BAD_LINE)] * len(rows)
        fkey = _pick(good[0], FILE_KEYS, "file", where)
        ckey = _pick(good[0], CAPTION_KEYS, "caption", where)
        return [(str(r.get(fkey, "")), r.get(ckey) or "") if r is not None else ("", BAD_LINE) for _, r in rows]

    def units(self) -> list[Unit]:
        n = len(self.items)
        return [
            Unit(i, f"items {s}-{min(s + self.shard_size, n) - 1}", min(self.shard_size, n - s), (s,))
            for i, s in enumerate(range(0, n, self.shard_size))
        ]

    def records(self, unit: Unit) -> Iterator[Record]:
        (start,) = unit.args
        for rel, caption in self.items[start : start + self.shard_size]:
            if caption == BAD_LINE:
                yield Record("", "", self.captions_file, bad="bad_caption_line")
            else:
                yield Record(rel, _clean(caption), rel, self.root / rel)


def _tar_label(url: str) -> str:
    target = url.split()[-1] if url.startswith("pipe:") else url
    return os.path.basename(target.rstrip("/")) or target


class TarSource(Source):
    """webdataset tar shards in img2dataset layout (``KEY.jpg`` + ``KEY.txt``/``KEY.json``); one tar = one unit.

    SOURCE may be a tar path, a brace pattern (``data/{00000..00099}.tar``), ``::``-joined patterns, a
    ``pipe:`` command (e.g. ``pipe:aws s3 cp s3://bucket/x.tar -``), a list file with one of those per line, or a
    folder of ``.tar`` files. Opening goes through webdataset's ``gopen``, which runs ``pipe:`` entries as shell
    commands. A ``pipe:`` typed as SOURCE is the user's own command; one inside a list file (which may come with a
    downloaded dataset) would run someone else's, so list files may only hold ``pipe:`` lines when
    ``allow_pipe_in_list`` (``embed --allow-pipe-in-list``) says so.
    """

    kind = "webdataset"

    def __init__(self, spec: str, allow_pipe_in_list: bool = False) -> None:
        from webdataset.shardlists import expand_urls

        super().__init__(spec)
        path = Path(spec)
        if path.is_dir():
            urls = [str(p) for p in sorted(path.glob("*.tar"))]
        elif path.is_file() and path.suffix in LIST_EXTS:
            urls = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                if entry.startswith("pipe:") and not allow_pipe_in_list:
                    raise ConfigError(
                        f"{spec} line {number} is a pipe: shell command; list files may not run commands unless "
                        "you pass --allow-pipe-in-list (check the file first)"
                    )
                urls.extend(expand_urls(entry))
        else:
            urls = expand_urls(spec)
        if not urls:
            raise ConfigError(f"embed source {spec!r}: no tar shards found")
        self.urls = urls

    def units(self) -> list[Unit]:
        return [Unit(i, _tar_label(u), self._stats_count(u), (u,)) for i, u in enumerate(self.urls)]

    @staticmethod
    def _stats_count(url: str) -> int | None:
        """img2dataset writes NNNNN_stats.json beside each tar: use its success count for the size estimate."""
        if url.startswith("pipe:") or not url.endswith(".tar"):
            return None
        stats = Path(url[: -len(".tar")] + "_stats.json")
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def records(self, unit: Unit) -> Iterator[Record]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import tar_file_iterator

        (url,) = unit.args
        label = unit.label
        current: dict[str, bytes] = {}
        key = None
        try:
            stream = gopen(url, "rb")
        except Exception:  # unreadable shard: count it, keep going with the others
            unit.skipped["unreadable_tar"] += 1
            return
        try:
            for member in tar_file_iterator(stream):
                k, ext = _split_key(member["fname"])
                if k != key and current:
                    yield from self._sample(label, key, current, unit)
                    current = {}
                key = k
                current[ext] = member["data"]
        except (tarfile.TarError, OSError, EOFError, ValueError):
            unit.skipped["broken_tar_member"] += 1  # truncated/corrupt tar: keep what was read before it
            current = {}
        finally:
            stream.close()
        if current:
            yield from self._sample(label, key, current, unit)

    @staticmethod
    def _sample(label: str, key: str, files: dict[str, bytes], unit: Unit) -> Iterator[Record]:
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if image_ext is None:
            unit.skipped["missing_image"] += 1
            return
        caption = files.get("txt", b"").decode("utf-8", "replace")
        source = f"{label}/{key}.{image_ext}"
        if not caption.strip() and "json" in files:
            try:
                meta = json.loads(files["json"])
                caption = meta.get("caption") or meta.get("text") or ""
                source = meta.get("url") or source
            except (ValueError, AttributeError):
                caption = ""
        yield Record(f"{label}/{key}", _clean(caption), source, files[image_ext])


def _split_key(fname: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything up to the first dot of the basename."""
    directory, base = os.path.split(fname)
    k, _, ext = base.partition(".")
    return os.path.join(directory, k), ext.lower()


class ClipRetrievalSource(Source):
    """clip-retrieval output: ``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy``, ``metadata/metadata_N.parquet``.

    Image vectors are used as they are (no re-encoding). They are L2-normalised, so the store is marked
    ``normalized=true``; unCLIP decoders expect raw embeddings, so such stores need an explicit opt-in downstream.
    """

    kind = "clip_retrieval"
    normalized = True
    precomputed = True

    def __init__(self, spec: str, shard_size: int) -> None:
        super().__init__(spec)
        self.root = Path(spec)
        self.shard_size = shard_size
        parts = sorted(
            (int(m.group(1)), p)
            for p in (self.root / "img_emb").glob("img_emb_*.npy")
            if (m := re.fullmatch(r"img_emb_(\d+)\.npy", p.name))
        )
        if not parts:
            raise ConfigError(f"embed source {spec!r}: no img_emb/img_emb_N.npy files")
        self.parts = [n for n, _ in parts]
        for n in self.parts:
            if not (self.root / "metadata" / f"metadata_{n}.parquet").is_file():
                raise ConfigError(f"embed source {spec!r}: metadata/metadata_{n}.parquet is missing")
        self.has_text = all((self.root / "text_emb" / f"text_emb_{n}.npy").is_file() for n in self.parts)
        self.dim = int(
            np.load(self.root / "img_emb" / f"img_emb_{self.parts[0]}.npy", mmap_mode="r").shape[1]
        )

    def units(self) -> list[Unit]:
        units = []
        for n in self.parts:
            rows = np.load(self.root / "img_emb" / f"img_emb_{n}.npy", mmap_mode="r").shape[0]
            for s in range(0, rows, self.shard_size):
                size = min(self.shard_size, rows - s)
                units.append(Unit(len(units), f"part {n} rows {s}-{s + size - 1}", size, (n, s, size)))
        return units

    def records(self, unit: Unit) -> Iterator[Record]:
        import pyarrow.parquet as pq

        n, start, size = unit.args
        img = np.load(self.root / "img_emb" / f"img_emb_{n}.npy", mmap_mode="r")[start : start + size]
        txt = None
        if self.has_text:
            txt = np.load(self.root / "text_emb" / f"text_emb_{n}.npy", mmap_mode="r")[start : start + size]
        table = pq.read_table(self.root / "metadata" / f"metadata_{n}.parquet").slice(start, size)
        cols = table.column_names
        captions = table.column("caption").to_pylist() if "caption" in cols else [""] * size
        urls = table.column("url").to_pylist() if "url" in cols else [None] * size
        for i in range(size):
            vecs = {"image_embeds": np.asarray(img[i], dtype=np.float32)}
            if txt is not None:
                vecs["text_embeds"] = np.asarray(txt[i], dtype=np.float32)
            if not all(np.isfinite(v).all() for v in vecs.values()):
                unit.skipped["nonfinite_embedding"] += 1
                continue
            row = start + i
            yield Record(f"{n}/{row}", _clean(captions[i]), urls[i] or f"metadata_{n}.parquet#{row}", vecs)


def open_source(spec: str | os.PathLike, shard_size: int = 10_000, allow_pipe_in_list: bool = False) -> Source:
    """Pick the source type from SOURCE: clip-retrieval folder, tar shards (or pattern/list/pipe), image folder.

    ``allow_pipe_in_list`` lets a list file's ``pipe:`` lines run as shell commands (see TarSource).
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "img_emb").is_dir():
            return ClipRetrievalSource(spec, shard_size)
        has_tars = any(path.glob("*.tar"))
        has_images = any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*"))
        if has_tars and not has_images:
            return TarSource(spec)
        return ImageFolderSource(spec, shard_size)
    if spec.startswith("pipe:") or "{" in spec or "::" in spec or spec.endswith((".tar", ".tgz", ".tar.gz")):
        if not spec.startswith("pipe:") and "{" not in spec and "::" not in spec and not path.is_file():
            raise ConfigError(f"embed source {spec!r}: no such file")
        return TarSource(spec)
    if path.is_file() and path.suffix in LIST_EXTS:
        return TarSource(spec, allow_pipe_in_list=allow_pipe_in_list)
    raise ConfigError(
        f"embed source {spec!r} not found or not recognised: give an image folder, a clip-retrieval folder, "
        "tar shards (path, {brace} pattern, list file or pipe: command)"
    )

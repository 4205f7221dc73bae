"""Image-text sources for ``embed``: an image folder, webdataset tar shards, or a clip-retrieval output folder.

A source is cut into *units* of work, each of which becomes exactly one store shard: fixed-size chunks of an image
folder or of a clip-retrieval part, or one whole tar. Units are fixed by the source alone (never by the number of
processes or by a previous run), which is what makes ``embed`` resumable and lets N processes produce the same
store as one; ``fingerprints()`` digests what each unit reads, so a resume can tell whether SOURCE changed. Bad
input (unreadable image, empty caption, broken tar, a path outside SOURCE, non-finite vector) is skipped and
counted under a reason, never fatal; text files go through ``data.text`` (BOM, counted non-UTF-8 fallback).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from eclipse_prior.data.images import DEFAULT_MAX_BYTES, FILE_TOO_LARGE, NOT_REGULAR_FILE
from eclipse_prior.data.text import DecodedText, decode_text, read_text_file
from eclipse_prior.errors import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LIST_EXTS = (".txt", ".list", ".shards", ".urls")
FILE_KEYS = ("file", "filename", "image", "path", "filepath", "image_path")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")
MAX_SIDECAR_BYTES = 1 << 20  # a caption file larger than this is not a caption
MAX_LIST_BYTES = 64 << 20
OUTSIDE_SOURCE = "outside_source"


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
    """A slice of the source that becomes one store shard; ``size`` is the item count when known up front.

    ``skipped`` counts rows dropped by reason; ``notes`` counts rows kept with a caveat (e.g. a caption that was
    not UTF-8 and was read as cp1252).
    """

    index: int
    label: str
    size: int | None
    args: tuple = ()
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def _refuse_special(path: Path) -> None:
    """A FIFO, device or folder where a data file belongs is a one-line error; opening it could block forever."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file; replace it with the file it stands for")


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stat_key(path: str | os.PathLike) -> list[Any]:
    """What a file looks like without reading it: type, size and modification time (or why it is absent)."""
    try:
        info = os.stat(path)
    except OSError as err:
        return ["absent", err.errno]
    except ValueError:  # NUL byte or unencodable character in the name
        return ["bad name"]
    kind = "file" if stat.S_ISREG(info.st_mode) else "other"
    return [kind, info.st_size, info.st_mtime_ns]


class Source:
    """Base: ``units()`` lists the work, ``records(unit)`` yields candidate rows (counting what it skips)."""

    kind = "source"
    normalized = False  # True when the source supplies L2-normalised vectors (clip-retrieval)
    precomputed = False  # True when image embeddings come with the source instead of from CLIP

    def __init__(self, spec: str) -> None:
        self.spec = spec
        # text files read with the non-UTF-8 fallback: label -> invalid UTF-8 sequences (reported and recorded)
        self.text_fallbacks: dict[str, int] = {}

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

    def fingerprints(self, units: list[Unit]) -> list[str]:
        """One digest per unit of everything that unit reads (listing, captions, file sizes and times)."""
        raise NotImplementedError

    def _decoded(self, label: str, decoded: DecodedText) -> str:
        if decoded.fell_back:
            self.text_fallbacks[label] = decoded.invalid_utf8
        return decoded.text


def _clean(caption: Any) -> str:
    return caption.strip() if isinstance(caption, str) else ""


def _pick(row: dict[str, Any], keys: tuple[str, ...], what: str, where: Path) -> str:
    for k in keys:
        if k in row:
            return k
    raise ConfigError(f"{where}: no {what} column (looked for {', '.join(keys)})")


BAD_LINE = "\0bad line"  # marks a malformed captions line in ImageFolderSource.items (skipped and counted)


class ImageFolderSource(Source):
    """Images with captions from ``captions.jsonl``/``captions.csv`` (file + caption) or a ``.txt`` per image.

    Every image path (named by a captions file or found in the folder) must resolve inside SOURCE: absolute paths,
    ``..`` and symlinks leading out are skipped as ``outside_source`` unless ``allow_outside_source``. A sidecar
    ``.txt`` leading out of SOURCE is never read.
    """

    kind = "image_folder"

    def __init__(self, spec: str, shard_size: int, allow_outside_source: bool = False) -> None:
        super().__init__(spec)
        self.root = Path(spec)
        self.real_root = self.root.resolve()
        self.shard_size = shard_size
        self.allow_outside_source = allow_outside_source
        self.bad_lines: list[int] = []  # line numbers of malformed captions.jsonl/csv lines (skipped, counted)
        self.captions_file = ""
        self.items = self._list()

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.real_root)
        except (OSError, ValueError, RuntimeError):  # a name the OS cannot take, a symlink loop
            return False

    def _list(self) -> list[tuple[str, str]]:
        """(file as written, caption) per row; a malformed captions line keeps its slot as ("", BAD_LINE)."""
        jsonl, csv_path = self.root / "captions.jsonl", self.root / "captions.csv"
        for path in (jsonl, csv_path):
            _refuse_special(path)
        rows: list[tuple[int, dict[str, Any] | None]] = []  # (line number, row or None when malformed)
        if jsonl.is_file():
            text = self._decoded(jsonl.name, read_text_file(jsonl))
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                        row = None
                    rows.append((number, row if isinstance(row, dict) else None))
        elif csv_path.is_file():
            text = self._decoded(csv_path.name, read_text_file(csv_path))
            reader = csv.DictReader(io.StringIO(text, newline=""))
            try:
                for row in reader:
                    # a short row leaves fields None, a long one puts the excess under the key None
                    ok = None not in row and all(v is not None for v in row.values())
                    rows.append((reader.line_num, row if ok else None))
            except csv.Error as err:
                raise ConfigError(f"{csv_path} line {reader.line_num}: not valid CSV ({err})") from None
        else:
            return self._list_folder()
        where = jsonl if jsonl.is_file() else csv_path
        self.bad_lines = [number for number, row in rows if row is None]
        self.captions_file = where.name
        good = [row for _, row in rows if row is not None]
        if not good:
            return [("", BAD_LINE)] * len(rows)
        fkey = _pick(good[0], FILE_KEYS, "file", where)
        ckey = _pick(good[0], CAPTION_KEYS, "caption", where)
        out = []
        for _, r in rows:
            if r is None or not isinstance(r.get(fkey, ""), str):
                out.append(("", BAD_LINE))
            else:
                out.append((r.get(fkey, ""), r.get(ckey) or ""))
        return out

    def _list_folder(self) -> list[tuple[str, str]]:
        images = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
        )
        out, fallbacks = [], 0
        for p in images:
            txt = p.with_suffix(".txt")
            caption = ""
            if txt.is_file() and (self.allow_outside_source or self._inside(txt)):
                try:
                    decoded = read_text_file(txt, MAX_SIDECAR_BYTES)
                    fallbacks += decoded.fell_back
                    caption = decoded.text
                except (OSError, ConfigError):  # unreadable or absurdly large: the row is skipped and counted
                    caption = BAD_LINE
            out.append((str(p.relative_to(self.root)), caption))
        if fallbacks:
            self.text_fallbacks[f"{fallbacks} sidecar .txt caption file(s)"] = fallbacks
        return out

    def _resolve(self, name: str) -> tuple[Path | None, str | None]:
        """The image path for a captions entry, or a skip reason (empty name, outside SOURCE)."""
        if not name:
            return None, "missing_image"
        if "\0" in name:
            return None, "bad_file_name"
        path = Path(name)
        if not path.is_absolute():
            path = self.root / path
        if not self.allow_outside_source and not self._inside(path):
            return None, OUTSIDE_SOURCE
        return path, None

    def units(self) -> list[Unit]:
        n = len(self.items)
        return [
            Unit(i, f"items {s}-{min(s + self.shard_size, n) - 1}", min(self.shard_size, n - s), (s,))
            for i, s in enumerate(range(0, n, self.shard_size))
        ]

    def records(self, unit: Unit) -> Iterator[Record]:
        (start,) = unit.args
        for name, caption in self.items[start : start + self.shard_size]:
            if caption == BAD_LINE:
                yield Record("", "", self.captions_file or name, bad="bad_caption_line")
                continue
            path, bad = self._resolve(name)
            yield Record(name, _clean(caption), name, path, bad=bad)

    def fingerprints(self, units: list[Unit]) -> list[str]:
        out = []
        for unit in units:
            (start,) = unit.args
            parts = []
            for name, caption in self.items[start : start + self.shard_size]:
                path, bad = self._resolve(name) if caption != BAD_LINE else (None, "bad")
                parts.append([name, caption, bad or _stat_key(path)])
            out.append(_digest([self.shard_size, parts]))
        return out


MAX_SHARD_URLS = 1_000_000
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}|\{([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?\}")


def _expansion_bound(pattern: str) -> int:
    """An upper bound on how many URLs a brace pattern expands to (braceexpand builds ranges eagerly, so
    ``{0..999999999}`` must be refused before expanding, not after)."""
    bound = 1
    try:
        for m in _RANGE.finditer(pattern):
            if m.group(1) is not None:
                lo, hi, step = int(m.group(1)), int(m.group(2)), m.group(3)
            else:
                lo, hi, step = ord(m.group(4)), ord(m.group(5)), m.group(6)
            bound *= abs(hi - lo) // max(1, abs(int(step or 1))) + 1
    except ValueError:  # a number too long to parse is a range too long to expand
        return MAX_SHARD_URLS + 1
    commas: list[int] = []  # per open brace: alternatives seen so far (nesting multiplies: an upper bound)
    for ch in pattern:
        if ch == "{":
            commas.append(0)
        elif ch == "," and commas:
            commas[-1] += 1
        elif ch == "}" and commas:
            bound *= commas.pop() + 1
    return bound


def expand_shard_urls(spec: str, where: str) -> list[str]:
    """webdataset's ``expand_urls`` (``::`` split, ``${WDS_var}`` substitution, brace expansion), refusing
    patterns that would expand to more than MAX_SHARD_URLS URLs."""
    from webdataset.shardlists import envsubst, expand_urls

    for part in spec.split("::"):
        for _ in range(10):  # as expand_urls substitutes
            part, last = envsubst(part), part
            if part == last:
                break
        if _expansion_bound(part) > MAX_SHARD_URLS:
            raise ConfigError(f"{where} expands to more than {MAX_SHARD_URLS} shard URLs; split it up")
    return expand_urls(spec)


def _tar_label(url: str) -> str:
    target = url.split()[-1] if url.startswith("pipe:") else url
    return os.path.basename(target.rstrip("/")) or target


def url_scheme(url: str) -> str:
    """The scheme webdataset's ``gopen`` will dispatch on (after its GOPEN_REWRITE rules), lower-cased."""
    from webdataset.gopen import rewrite_url

    return urlparse(rewrite_url(url)).scheme.lower()


def _is_local(url: str) -> bool:
    return url_scheme(url) in ("", "file")


def _local_path(url: str) -> str:
    from urllib.request import url2pathname

    return url2pathname(urlparse(url).path) if url_scheme(url) == "file" else url


class _WatchedTarInfo(tarfile.TarInfo):
    """Records how a streamed tar ended: tarfile treats a missing end-of-archive marker as a normal end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the archive's proper end
            tar.eclipse_end = "marker"  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError:  # no bytes, part of a header, or garbage where a header belongs
            tar.eclipse_end = "cut"  # type: ignore[attr-defined]
            raise


class TarSource(Source):
    """webdataset tar shards in img2dataset layout (``KEY.jpg`` + ``KEY.txt``/``KEY.json``); one tar = one unit.

    SOURCE may be a tar path, a brace pattern (``data/{00000..00099}.tar``), ``::``-joined patterns, a
    ``pipe:`` command (e.g. ``pipe:aws s3 cp s3://bucket/x.tar -``), a list file with one of those per line, or a
    folder of ``.tar`` files. Remote entries open through webdataset's ``gopen``, which runs ``pipe:`` entries as
    shell commands. A ``pipe:`` typed as SOURCE is the user's own command; one from a list file (which may come
    with a downloaded dataset) would run someone else's, so every URL a list line expands to (after ``::``
    splitting, brace and variable expansion, and gopen's own rewrite rules) is refused if it would run a command,
    unless ``allow_pipe_in_list`` (``embed --allow-pipe-in-list``) says so. Local tars are opened directly (never
    through gopen), only when they are regular files.
    """

    kind = "webdataset"

    def __init__(self, spec: str, allow_pipe_in_list: bool = False, max_member_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(spec)
        self.max_member_bytes = max_member_bytes
        path = Path(spec)
        if path.is_dir():
            urls = [str(p.absolute()) for p in sorted(path.glob("*.tar"))]
        elif path.is_file() and path.suffix in LIST_EXTS:
            text = self._decoded(path.name, read_text_file(path, MAX_LIST_BYTES))
            urls = []
            for number, line in enumerate(text.splitlines(), start=1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                expanded = expand_shard_urls(entry, f"{spec} line {number}")
                for url in expanded:
                    if url_scheme(url) == "pipe" and not allow_pipe_in_list:
                        raise ConfigError(
                            f"{spec} line {number} expands to a pipe: shell command ({url[:60]!r}); list files may "
                            "not run commands unless you pass --allow-pipe-in-list (check the file first)"
                        )
                urls.extend(expanded)
        else:
            urls = expand_shard_urls(spec, f"embed source {spec!r}")
        if not urls:
            raise ConfigError(f"embed source {spec!r}: no tar shards found")
        self.urls = urls

    def units(self) -> list[Unit]:
        return [Unit(i, _tar_label(u), self._stats_count(u), (u,)) for i, u in enumerate(self.urls)]

    def fingerprints(self, units: list[Unit]) -> list[str]:
        return [_digest([u.args[0], _stat_key(_local_path(u.args[0])) if _is_local(u.args[0]) else None])
                for u in units]

    @staticmethod
    def _stats_count(url: str) -> int | None:
        """img2dataset writes NNNNN_stats.json beside each tar: use its success count for the size estimate."""
        if not _is_local(url) or not url.endswith(".tar"):
            return None
        stats = Path(_local_path(url)[: -len(".tar")] + "_stats.json")
        try:
            if not stats.is_file() or stats.stat().st_size > MAX_SIDECAR_BYTES:
                return None
            count = json.loads(stats.read_bytes())["successes"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return count if isinstance(count, int) and count >= 0 else None

    def _open(self, url: str, unit: Unit):
        from webdataset.gopen import gopen

        if _is_local(url):
            local = _local_path(url)
            try:
                if not stat.S_ISREG(os.stat(local).st_mode):  # a FIFO named x.tar would block forever
                    unit.skipped[NOT_REGULAR_FILE] += 1
                    return None
                return open(local, "rb")
            except OSError:
                unit.skipped["unreadable_tar"] += 1
                return None
        try:
            return gopen(url, "rb")
        except Exception:  # unreadable shard: count it, keep going with the others
            unit.skipped["unreadable_tar"] += 1
            return None

    def records(self, unit: Unit) -> Iterator[Record]:
        (url,) = unit.args
        stream = self._open(url, unit)
        if stream is None:
            return
        label = unit.label
        current: dict[str, bytes | None] = {}
        key = None
        samples = 0
        cut = False
        members = 0
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)
            for info in tar:
                members += 1
                if not info.isreg():
                    continue
                k, ext = _split_key(info.name)
                if k != key and current:
                    samples += 1
                    yield from self._sample(label, key, current, unit)
                    current = {}
                key = k
                if info.size > self.max_member_bytes:  # never read into memory; the sample is skipped
                    current[ext] = None
                    continue
                member = tar.extractfile(info)
                current[ext] = member.read() if member is not None else b""
                tar.members = []  # streaming: do not keep every header in memory
            cut = getattr(tar, "eclipse_end", "marker") != "marker"
        except (tarfile.TarError, OSError, EOFError, ValueError):
            cut = True  # the member being read is lost with whatever followed it
            current = {}
        finally:
            try:
                stream.close()  # a pipe: or download that failed reports it here
            except Exception:
                cut = True
        if current:
            samples += 1
            yield from self._sample(label, key, current, unit)
        if cut:
            unit.skipped["truncated_tar" if members else "unreadable_tar"] += 1
            if unit.size is not None and unit.size > samples:  # img2dataset's stats say how many were there
                unit.skipped["tar_samples_missing"] += unit.size - samples

    @staticmethod
    def _sample(label: str, key: str, files: dict[str, bytes | None], unit: Unit) -> Iterator[Record]:
        image_ext = next((e for e in TAR_IMAGE_EXTS if e in files), None)
        if image_ext is None:
            unit.skipped["missing_image"] += 1
            return
        if files[image_ext] is None:
            unit.skipped[FILE_TOO_LARGE] += 1
            return
        decoded = decode_text(files.get("txt") or b"")
        if decoded.fell_back:
            unit.notes["tar_caption_not_utf8_read_as_cp1252"] += 1
        caption = decoded.text
        source = f"{label}/{key}.{image_ext}"
        if not caption.strip() and files.get("json"):
            try:
                meta = json.loads(decode_text(files["json"]).text)
                caption = meta.get("caption") or meta.get("text") or ""
                source = str(meta.get("url") or source)
            except (ValueError, AttributeError, RecursionError):
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
    The three files of a part must agree in row count (rows are matched by position), else a one-line error.
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
        self.has_text = all(self._file("text_emb", n).exists() for n in self.parts)
        self.rows: dict[int, int] = {}
        self.dim = 0
        for n in self.parts:
            self.rows[n] = self._check_part(n)

    def _file(self, kind: str, n: int) -> Path:
        suffix = "parquet" if kind == "metadata" else "npy"
        return self.root / kind / f"{kind}_{n}.{suffix}"

    def _vectors(self, path: Path) -> np.ndarray:
        _refuse_special(path)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable .npy array ({str(err).splitlines()[0]})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"{path}: expected a 2-D float array of vectors, found shape {arr.shape} {arr.dtype}")
        return arr

    def _check_part(self, n: int) -> int:
        """Row count of part ``n`` after checking that its files agree (shape, width, rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        img_path, meta_path = self._file("img_emb", n), self._file("metadata", n)
        img = self._vectors(img_path)
        self.dim = self.dim or int(img.shape[1])
        counts = {img_path: img.shape[0]}
        widths = {img_path: img.shape[1]}
        if self.has_text:
            txt_path = self._file("text_emb", n)
            txt = self._vectors(txt_path)
            counts[txt_path], widths[txt_path] = txt.shape[0], txt.shape[1]
        _refuse_special(meta_path)
        if not meta_path.is_file():
            raise ConfigError(f"embed source {self.spec!r}: {meta_path.relative_to(self.root)} is missing")
        try:
            counts[meta_path] = pq.ParquetFile(meta_path).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise ConfigError(f"{meta_path}: not a readable parquet file ({err})") from None
        if len(set(widths.values()) | {self.dim}) != 1:
            shown = ", ".join(f"{p.relative_to(self.root)} {w}" for p, w in widths.items())
            raise ConfigError(f"clip-retrieval folder {self.spec}: vector widths disagree ({shown}; part 0 has {self.dim})")
        if len(set(counts.values())) != 1:
            shown = ", ".join(f"{p.relative_to(self.root)} {c}" for p, c in counts.items())
            raise ConfigError(
                f"clip-retrieval folder {self.spec}: part {n} files disagree in row count ({shown}); rows are matched "
                "by position, so the part cannot be used: re-export it or remove the part"
            )
        return int(img.shape[0])

    def units(self) -> list[Unit]:
        units = []
        for n in self.parts:
            rows = self.rows[n]
            for s in range(0, rows, self.shard_size):
                size = min(self.shard_size, rows - s)
                units.append(Unit(len(units), f"part {n} rows {s}-{s + size - 1}", size, (n, s, size)))
        return units

    def fingerprints(self, units: list[Unit]) -> list[str]:
        files = {n: [_stat_key(self._file(k, n)) for k in ("img_emb", "text_emb", "metadata")] for n in self.parts}
        return [_digest([u.args, files[u.args[0]]]) for u in units]

    def records(self, unit: Unit) -> Iterator[Record]:
        import pyarrow.parquet as pq

        n, start, size = unit.args
        img = np.load(self._file("img_emb", n), mmap_mode="r")[start : start + size]
        txt = None
        if self.has_text:
            txt = np.load(self._file("text_emb", n), mmap_mode="r")[start : start + size]
        table = pq.read_table(self._file("metadata", n)).slice(start, size)
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
            yield Record(f"{n}/{row}", _clean(captions[i]), str(urls[i] or f"metadata_{n}.parquet#{row}"), vecs)


def open_source(
    spec: str | os.PathLike,
    shard_size: int = 10_000,
    allow_pipe_in_list: bool = False,
    allow_outside_source: bool = False,
    max_image_bytes: int = DEFAULT_MAX_BYTES,
) -> Source:
    """Pick the source type from SOURCE: clip-retrieval folder, tar shards (or pattern/list/pipe), image folder.

    ``allow_pipe_in_list`` lets a list file's ``pipe:`` lines run as shell commands (see TarSource);
    ``allow_outside_source`` lets a captions file name images outside SOURCE (see ImageFolderSource).
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "img_emb").is_dir():
            return ClipRetrievalSource(spec, shard_size)
        has_tars = any(path.glob("*.tar"))
        has_images = any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*"))
        if has_tars and not has_images:
            return TarSource(spec, max_member_bytes=max_image_bytes)
        return ImageFolderSource(spec, shard_size, allow_outside_source=allow_outside_source)
    if spec.startswith("pipe:") or "{" in spec or "::" in spec or spec.endswith((".tar", ".tgz", ".tar.gz")):
        if not spec.startswith("pipe:") and "{" not in spec and "::" not in spec and not path.is_file():
            raise ConfigError(f"embed source {spec!r}: no such file")
        return TarSource(spec, max_member_bytes=max_image_bytes)
    if path.is_file() and path.suffix in LIST_EXTS:
        return TarSource(spec, allow_pipe_in_list=allow_pipe_in_list, max_member_bytes=max_image_bytes)
    raise ConfigError(
        f"embed source {spec!r} not found or not recognised: give an image folder, a clip-retrieval folder, "
        "tar shards (path, {brace} pattern, list file or pipe: command)"
    )

"""Sharded, memory-mapped embedding store: CLIP vectors computed once, read by training and evaluation.

Layout of a store folder::

    manifest.json           format/version, CLIP id+revision, dims, dtype, normalized flag, rows, shards with
                            per-file sha256, split rule, source, creation command, skip/truncation summary,
                            text_layout (ragged or padded)
    shard-00000/
        image_embeds.npy    (n, E)     fp16 or fp32
        text_embeds.npy     (n, E')    pooled projected text embeddings
        text_states.npy     (T, D)     optional per-token last_hidden_state, each row's tokens up to its last
                                       unmasked one, rows concatenated (ragged layout; T = sum of lengths)
        text_mask.npy       (T,)       optional bool tokenizer mask of those tokens
        text_offsets.npy    (n + 1,)   int64: row i's tokens are [offsets[i], offsets[i+1])
        row_hash.npy        (n,)       uint64 hash of the row id (drives the train/val split)
        caption_ids.npy     (n,)       int64 hash of the caption text (equal captions -> equal ids)
        meta.jsonl          one {"id", "caption", "source"} per row
        shard.json          rows, checksums and this shard's skip/truncation counts

Why ragged: the prior masks every token after a caption's last unmasked one, so those states carry nothing, and
with real captions (12.7 CLIP tokens on average for the T2I-CompBench prompts) they are ~84% of a 77-token row.
Ragged rows with offsets keep exactly the useful bytes, keep the row order (so the split, shard offsets and
``indices`` stay as they were) and make every row one contiguous extent, i.e. one read. Length-bucketed shards
would need an indirection table and still pad within buckets. Version-1 stores (and stores resumed from a run
started by an older version) keep the padded layout: ``text_states.npy`` (n, L, D), ``text_mask.npy`` (n, L);
both layouts read through the same code and give the same batches.

Shards appear atomically (written to a temporary folder, then ``os.replace``d), so a killed ``embed`` leaves only
complete shards and resumes from them; the manifest is written last, also atomically, and only once every shard
exists. A store is either raw CLIP embeddings (what unCLIP decoders expect) or L2-normalised ones (clip-retrieval);
``normalized`` records which, the writer refuses to mix them, and consumers must check it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from eclipse_prior.errors import StoreError
from eclipse_prior.outputs import LOCK_NAME, write_json_atomic

FORMAT = "eclipse-prior-store"
VERSION = 2  # 2: text_layout in the manifest, ragged text states by default; 1: padded text states
READABLE_VERSIONS = (1, 2)
LAYOUTS = ("ragged", "padded")
MANIFEST = "manifest.json"
SETTINGS = ".embed-settings.json"  # written when a store is started; removed once the manifest exists
SHARD_INFO = "shard.json"
META = "meta.jsonl"
DTYPES = {"fp16": "float16", "fp32": "float32", "float16": "float16", "float32": "float32"}
SPLIT_RULE = "val if (uint64 of the first 8 bytes, big-endian, of sha256(row id)) / 2**64 < val_fraction"
FLOAT_ARRAYS = ("image_embeds", "text_embeds", "text_states")
NORM_TOLERANCE = 1e-2
TEXT_LENGTHS = ("fixed", "batch", "ragged")
#: Mean CLIP tokens per caption, start and end tokens included, of the T2I-CompBench val prompts with CLIP's BPE
#: (benchmarks/caption_lengths.py): what a compact row keeps on average; embed's size estimate uses it.
TYPICAL_TEXT_TOKENS = 12.7
READ_THREADS = 8  # concurrent gathers: queue depth for cold random reads, both cores for warm ones
Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _hash64(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:8]


def row_hashes(ids: Sequence[str]) -> np.ndarray:
    """uint64 hash of each row id; the split depends only on this, so it never changes with shard layout."""
    return np.array([int.from_bytes(_hash64(i), "big") for i in ids], dtype=np.uint64)


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
    """int64 id of each caption text; equal captions get equal ids (used to avoid false negatives)."""
    return np.array([int.from_bytes(_hash64(c), "big", signed=True) for c in captions], dtype=np.int64)


def val_mask(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """Rows in the validation split: hash / 2**64 < val_fraction (exact in float64 after dropping 11 bits)."""
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def merge_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add nested integer counters (skip reasons, truncations) of ``part`` into ``total``."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


class StoreWriter:
    """Writes shards atomically and, once all exist, the manifest. Safe to reopen to resume a killed run.

    ``settings`` (CLIP id/revision, dims, dtype, normalized, source, shard size, ...) are pinned when the store is
    started; reopening with different settings is refused so a resumed store never mixes two configurations.
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        settings = dict(settings)
        settings["dtype"] = DTYPES.get(settings.get("dtype", "fp16"), None) or _bad_dtype(
            settings.get("dtype")
        )
        self.settings = settings
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
        else:  # rank 0 creates the store and pins its settings first; other ranks follow (no collectives needed)
            while not ((self.path / SETTINGS).is_file() or (self.path / MANIFEST).is_file()):
                time.sleep(0.2)
        existing = self._existing_settings()
        if existing is not None and "text_layout" not in existing:  # started by a version-1 writer: keep its layout
            existing["text_layout"] = "padded" if existing.get("text_states") else None
            self.settings["text_layout"] = settings["text_layout"] = existing["text_layout"]
        if existing is not None:
            diffs = [k for k in sorted(set(existing) | set(settings)) if existing.get(k) != settings.get(k)]
            if diffs:
                k = diffs[0]
                raise StoreError(
                    f"store {self.path} was started with different settings ({k}: {existing.get(k)!r} there, "
                    f"{settings.get(k)!r} now); use another --out or delete the folder"
                )
        elif rank == 0:
            write_json_atomic(self.path / SETTINGS, settings)
        for stale in self.path.glob(f".tmp-r{rank}-*"):  # leftovers of this rank's killed run
            shutil.rmtree(stale, ignore_errors=True)

    def _existing_settings(self) -> dict[str, Any] | None:
        if (self.path / MANIFEST).is_file():
            return json.loads((self.path / MANIFEST).read_text())["settings"]
        if (self.path / SETTINGS).is_file():
            return json.loads((self.path / SETTINGS).read_text())
        if any(p.name != LOCK_NAME for p in self.path.iterdir()) and self.rank == 0:
            raise StoreError(
                f"{self.path} exists and is not an embedding store; choose an empty or new --out"
            )
        return None

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def done(self, index: int) -> bool:
        """True if shard ``index`` was fully written (by this or an earlier, killed run)."""
        return (self.path / shard_name(index) / SHARD_INFO).is_file()

    def write_shard(
        self,
        index: int,
        arrays: dict[str, np.ndarray],
        meta: list[dict[str, str]],
        summary: dict[str, Any] | None = None,
    ) -> Path:
        """Write one shard (rows in ``meta`` order) into a temporary folder, then rename it into place."""
        n = len(meta)
        self._check(arrays, n, index)
        final = self.path / shard_name(index)
        tmp = self.path / f".tmp-r{self.rank}-{shard_name(index)}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            return self._fill_and_place(tmp, final, arrays, meta, summary)
        except BaseException:  # disk full, killed, ...: leave no half-written shard behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fill_and_place(
        self, tmp: Path, final: Path, arrays: dict[str, np.ndarray], meta: list[dict[str, str]],
        summary: dict[str, Any] | None,
    ) -> Path:
        n = len(meta)
        dtype = np.dtype(self.settings["dtype"])
        files: dict[str, np.ndarray] = {}
        for key, arr in arrays.items():
            files[key] = np.asarray(arr, dtype=bool if key == "text_mask" else dtype)
        tokens = None
        if "text_states" in files and self.settings.get("text_layout") == "ragged":
            lengths = text_lengths(files["text_mask"])
            keep = np.arange(files["text_mask"].shape[1])[None, :] < lengths[:, None]
            files["text_states"] = files["text_states"][keep]  # row-major: rows concatenated, in order
            files["text_mask"] = files["text_mask"][keep]
            files["text_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            tokens = int(files["text_offsets"][-1])
        files["row_hash"] = row_hashes([m["id"] for m in meta])
        files["caption_ids"] = caption_hashes([m["caption"] for m in meta])
        sums = {}
        for key, arr in files.items():
            np.save(tmp / f"{key}.npy", arr)
            sums[f"{key}.npy"] = sha256_file(tmp / f"{key}.npy")
        with open(tmp / META, "w") as f:
            for m in meta:
                f.write(
                    json.dumps({"id": m["id"], "caption": m["caption"], "source": m.get("source", "")}) + "\n"
                )
        sums[META] = sha256_file(tmp / META)
        info = {"name": final.name, "rows": n, "sha256": sums, "summary": summary or {}}
        if tokens is not None:
            info["text_tokens"] = tokens
        write_json_atomic(tmp / SHARD_INFO, info)
        if (
            final.exists()
        ):  # a shard folder without shard.json cannot exist (rename is atomic): a twin finished it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        return final

    def _check(self, arrays: dict[str, np.ndarray], n: int, index: int) -> None:
        s = self.settings
        want = {"image_embeds": (n, s["image_dim"]), "text_embeds": (n, s["text_dim"])}
        if s.get("text_states"):
            want["text_states"] = (n, s["text_seq_len"], s["text_state_dim"])
            want["text_mask"] = (n, s["text_seq_len"])
        if set(arrays) != set(want):
            raise StoreError(f"shard {index}: arrays {sorted(arrays)} but this store holds {sorted(want)}")
        for key, shape in want.items():
            arr = np.asarray(arrays[key])
            if arr.shape != shape:
                raise StoreError(f"shard {index}: {key} has shape {arr.shape}, expected {shape}")
            if key != "text_mask" and not np.isfinite(arr).all():
                raise StoreError(f"shard {index}: {key} contains NaN or Inf")
        for key in ("image_embeds", "text_embeds"):
            if n == 0:
                continue
            norms = np.linalg.norm(np.asarray(arrays[key], dtype=np.float64), axis=-1)
            unit = bool(np.all(np.abs(norms - 1.0) < NORM_TOLERANCE))
            if s["normalized"] and not unit:
                raise StoreError(
                    f"shard {index}: {key} are not L2-normalised but the store is marked normalized=true; "
                    "refusing to mix normalised and raw vectors"
                )

    def finalize(self, num_shards: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write manifest.json once shards 0..num_shards-1 all exist; returns the manifest."""
        missing = [shard_name(i) for i in range(num_shards) if not self.done(i)]
        if missing:
            raise StoreError(
                f"store {self.path}: cannot finalize, missing {len(missing)} shard(s) e.g. {missing[0]}"
            )
        shards, summary = [], {}
        for i in range(num_shards):
            info = json.loads((self.path / shard_name(i) / SHARD_INFO).read_text())
            shards.append({k: info[k] for k in ("name", "rows", "text_tokens", "sha256") if k in info})
            merge_counts(summary, info["summary"])
        s = self.settings
        rows = sum(sh["rows"] for sh in shards)
        summary["rows_written"] = rows
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "clip": {"id": s["clip_id"], "revision": s["clip_revision"]},
            "image_dim": s["image_dim"],
            "text_dim": s["text_dim"],
            "has_text_states": bool(s.get("text_states")),
            "text_seq_len": s.get("text_seq_len"),
            "text_state_dim": s.get("text_state_dim"),
            "text_layout": s.get("text_layout"),
            "text_tokens": sum(sh.get("text_tokens", 0) for sh in shards) if s.get("text_layout") == "ragged" else None,
            "dtype": s["dtype"],
            "normalized": bool(s["normalized"]),
            "num_rows": rows,
            "shards": shards,
            "split": {"rule": SPLIT_RULE, "val_fraction": s["val_fraction"]},
            "source": s.get("source"),
            "summary": summary,
            "settings": s,
            **(extra or {}),
        }
        if rows == 0:
            raise StoreError(f"store {self.path}: no usable rows (summary: {json.dumps(summary)})")
        write_json_atomic(self.path / MANIFEST, manifest)
        (self.path / SETTINGS).unlink(missing_ok=True)
        for stale in self.path.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return manifest


def _bad_dtype(dtype: Any) -> str:
    raise StoreError(f"unsupported store dtype {dtype!r}; use fp16 or fp32")


# Manifest fields readers rely on, with their types (a hand-edited manifest is one line, not a KeyError later).
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "clip": dict, "image_dim": int, "text_dim": int, "has_text_states": bool, "dtype": str, "normalized": bool,
    "shards": list, "split": dict,
}


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    def bad(what: str) -> StoreError:
        return StoreError(f"store {path}: {MANIFEST} {what}; the store is damaged, re-embed it")

    for key, kind in _MANIFEST_TYPES.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool) and kind is int:
            raise bad(f"field {key} is missing or not a {getattr(kind, '__name__', kind)}")
    if not isinstance(manifest["clip"].get("id"), str) or not isinstance(manifest["split"].get("val_fraction"),
                                                                         int | float):
        raise bad("has no clip id or split val_fraction")
    for shard in manifest["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and isinstance(shard.get("rows"), int)
                and not isinstance(shard.get("rows"), bool) and shard["rows"] >= 0
                and "/" not in shard["name"] and shard["name"] not in ("", ".", "..")):
            raise bad(f"lists a shard that is not {{name, rows}}: {str(shard)[:80]}")


def text_lengths(mask: np.ndarray) -> np.ndarray:
    """Tokens up to and including each row's last unmasked one (0 for an all-masked row): what a compact row keeps."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[-1] == 0:
        return np.zeros(mask.shape[:-1], dtype=np.int64)
    last = mask.shape[-1] - np.argmax(mask[..., ::-1], axis=-1)
    return np.where(mask.any(axis=-1), last, 0).astype(np.int64)


def token_positions(rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, position) of every token of ragged segments: where ``get_batch(text_length="ragged")``'s
    ``text_states`` go in a padded (B, L, D) batch, e.g. ``padded[row, pos] = text_states`` on the device."""
    rows, lengths = np.asarray(rows, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return np.repeat(rows, lengths), positions


def _default_allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


class BufferRing:
    """Output buffers reused in turn by ``depth`` batches: ``get_batch(rows, allocate=ring.batch())``.

    A batch with text states is tens of MB; fresh memory costs a page fault per 4 KiB on first write, which took
    ~25% of a warm ragged read here. A batch's arrays stay valid until ``depth`` more batches have been allocated.
    """

    def __init__(self, depth: int = 2) -> None:
        self._slots: list[dict[int, np.ndarray]] = [{} for _ in range(max(1, depth))]
        self._turn = -1

    def batch(self) -> Allocate:
        """The allocator for the next batch (the oldest slot's buffers, grown when too small)."""
        self._turn = (self._turn + 1) % len(self._slots)
        slot, calls = self._slots[self._turn], iter(range(1 << 30))

        def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            key, size = next(calls), int(np.prod(shape)) * np.dtype(dtype).itemsize
            buf = slot.get(key)
            if buf is None or buf.nbytes < size:
                buf = slot[key] = np.empty(size + size // 4, dtype=np.uint8)  # headroom: batches vary in tokens
            return buf[:size].view(dtype).reshape(shape)

        return allocate


class EmbeddingStore:
    """Read-only, memory-mapped view of a finished store.

    ``get_batch`` gives float32 vectors by default (what evaluation code expects); training asks for the store's
    own dtype, only the arrays it uses, and ragged text states, and converts and pads on its device.
    ``read_threads`` gathers run concurrently, which gives cold random reads queue depth.
    """

    def __init__(self, path: str | os.PathLike, read_threads: int = READ_THREADS) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            if (self.path / SETTINGS).is_file():
                raise StoreError(
                    f"store {self.path} is incomplete (embed was interrupted): rerun embed to finish it"
                )
            raise StoreError(
                f"{self.path} is not an embedding store (no {MANIFEST}); create one with eclipse-prior embed"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"store {self.path}: unreadable {MANIFEST} ({err})") from err
        if not isinstance(self.manifest, dict):
            raise StoreError(f"store {self.path}: {MANIFEST} does not hold an object; re-embed the store")
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") not in READABLE_VERSIONS:
            raise StoreError(
                f"store {self.path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')} "
                f"is not {FORMAT} v{'/v'.join(map(str, READABLE_VERSIONS))}"
            )
        _check_manifest(self.path, self.manifest)
        layout = self.manifest.get("text_layout") or ("padded" if self.manifest["has_text_states"] else None)
        if self.manifest["has_text_states"] and layout not in LAYOUTS:
            raise StoreError(f"store {self.path}: unknown text_layout {layout!r} (expected one of {LAYOUTS})")
        self.text_layout: str | None = layout
        self.read_threads = max(1, int(read_threads))
        self._shards = self.manifest["shards"]
        self._offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self._shards])]).astype(np.int64)
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._meta: dict[int, list[dict[str, str]]] = {}
        self._hash: np.ndarray | None = None
        self._caption_ids: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._fds: dict[int, int] = {}  # text_states.npy of each shard, for preads
        self.bytes_read: dict[str, int] = {}  # bytes gathered per array since opening (benchmarks: bytes/row)
        self._lock = threading.Lock()

    # --- description -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, clip={self.clip_id!r}, dtype={self.dtype})"
        )

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def close(self) -> None:
        """Unmap the shard files and stop the reader threads; the store reopens them on the next read.

        (Mapped pages stay in the page cache whatever posix_fadvise says, so a cold-read measurement closes first.)
        """
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._arrays.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @property
    def image_dim(self) -> int:
        return int(self.manifest["image_dim"])

    @property
    def text_dim(self) -> int:
        return int(self.manifest["text_dim"])

    @property
    def has_text_states(self) -> bool:
        return bool(self.manifest["has_text_states"])

    @property
    def text_seq_len(self) -> int | None:
        return self.manifest.get("text_seq_len")

    @property
    def text_state_dim(self) -> int | None:
        return self.manifest.get("text_state_dim")

    @property
    def normalized(self) -> bool:
        return bool(self.manifest["normalized"])

    @property
    def clip_id(self) -> str:
        return str(self.manifest["clip"]["id"])

    @property
    def clip_revision(self) -> str:
        return str(self.manifest["clip"]["revision"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def val_fraction(self) -> float:
        return float(self.manifest["split"]["val_fraction"])

    @property
    def array_names(self) -> tuple[str, ...]:
        names = ("image_embeds", "text_embeds")
        return names + (("text_states", "text_mask") if self.has_text_states else ())

    @property
    def shard_offsets(self) -> np.ndarray:
        """Global index of each shard's first row, plus the total at the end (for shard-aware samplers)."""
        return self._offsets.copy()

    def disk_bytes(self) -> int:
        """Bytes of all shard files (what a full pass reads)."""
        return sum((self.path / s["name"] / f).stat().st_size for s in self._shards for f in s["sha256"])

    # --- access ------------------------------------------------------------------------------------------------
    def _array(self, shard: int, key: str) -> np.ndarray:
        arr = self._arrays.get((shard, key))
        if arr is not None:
            return arr
        # Opened once, by one reader thread at a time: np.load parses the header with ast.literal_eval, which
        # CPython 3.11 (seen on 3.11.7) can fail with "AST constructor recursion depth mismatch" when threads race.
        with self._lock:
            arr = self._arrays.get((shard, key))
            if arr is None:
                file = self.path / self._shards[shard]["name"] / f"{key}.npy"
                try:
                    arr = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as err:
                    raise StoreError(
                        f"store {self.path}: shard {self._shards[shard]['name']}: cannot read {file.name} ({err})"
                    ) from err
                self._arrays[(shard, key)] = arr
        return arr

    def _concat(self, key: str) -> np.ndarray:
        parts = [np.asarray(self._array(i, key)) for i, s in enumerate(self._shards) if s["rows"] > 0]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _indices(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"store index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        return idx

    def split_indices(self, split: str = "train") -> np.ndarray:
        """Row indices of ``train``, ``val`` or ``all``; fixed by each row id's hash, never by order or sharding."""
        if split == "all":
            return np.arange(len(self), dtype=np.int64)
        if split not in ("train", "val"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        if self._hash is None:
            self._hash = self._concat("row_hash").astype(np.uint64)
        is_val = val_mask(self._hash, self.val_fraction)
        return np.flatnonzero(is_val if split == "val" else ~is_val).astype(np.int64)

    def _token_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's text states as (tokens, D) and mask as (tokens,), whatever the layout (views, no reads)."""
        states, mask = self._array(shard, "text_states"), self._array(shard, "text_mask")
        if self.text_layout == "padded":
            return states.reshape(-1, states.shape[-1]), mask.reshape(-1)
        return states, mask

    def _spans(self, shard: int, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First token and token count of each local row in ``_token_arrays`` (padded: counted from the mask)."""
        if self.text_layout == "padded":
            length = int(self.text_seq_len or 0)
            return local * length, text_lengths(self._array(shard, "text_mask")[local])
        offsets = self._array(shard, "text_offsets")
        starts = np.asarray(offsets[local], dtype=np.int64)
        return starts, np.asarray(offsets[local + 1], dtype=np.int64) - starts

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) <= 1 or self.read_threads == 1:
            for task in tasks:
                task()
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="store-read")
            pool = self._pool
        for future in [pool.submit(t) for t in tasks]:
            future.result()

    def _count(self, key: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_read[key] = self.bytes_read.get(key, 0) + int(nbytes)

    def get_batch(
        self,
        indices: Iterable[int] | np.ndarray,
        fields: Sequence[str] | None = None,
        dtype: str | None = "float32",
        text_length: str = "fixed",
        allocate: Allocate | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows gathered across shards in the given order; only ``fields`` are read (default: all arrays).

        ``dtype``: float32 (default) or None for the store's own dtype (half the bytes with fp16: convert on the
        device). ``text_length``: ``fixed`` pads text_states/text_mask to the store's text length (what priors
        take), ``batch`` to the batch's longest row, ``ragged`` returns each row's tokens up to its last unmasked
        one, concatenated in store order (the order they are read in), with ``text_rows`` (batch row of each
        segment) and ``text_lengths``; ``token_positions`` places them into a padded batch. Padding states are
        zero, padding mask False. ``allocate(shape, dtype)`` supplies the output arrays (pinned memory, or reused
        ones: ``BufferRing``).
        """
        idx = self._indices(indices)
        fields = tuple(self.array_names if fields is None else fields)
        unknown = set(fields) - set(self.array_names)
        if unknown:
            raise StoreError(f"store {self.path} has no {sorted(unknown)} (it holds {list(self.array_names)})")
        if text_length not in TEXT_LENGTHS:
            raise ValueError(f"text_length must be one of {TEXT_LENGTHS}, not {text_length!r}")
        alloc = allocate or _default_allocate
        out_dtype = np.dtype(self.dtype if dtype is None else DTYPES.get(dtype, dtype))
        # Read each shard's rows in file order; ``order`` maps the sorted reads back to batch positions.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.searchsorted(sorted_idx, self._offsets)  # sorted_idx[bounds[s]:bounds[s+1]] lie in shard s
        shards = [s for s in range(len(self._shards)) if bounds[s + 1] > bounds[s]]
        out: dict[str, np.ndarray] = {}
        tasks: list[Callable[[], None]] = []
        chunk = max(64, -(-len(idx) // self.read_threads))
        for key in (k for k in ("image_embeds", "text_embeds") if k in fields):
            width = self.image_dim if key == "image_embeds" else self.text_dim
            out[key] = alloc((len(idx), width), out_dtype)
            for s in shards:
                for a in range(int(bounds[s]), int(bounds[s + 1]), chunk):
                    b = min(a + chunk, int(bounds[s + 1]))
                    tasks.append(self._vector_task(s, key, out[key], order[a:b], sorted_idx[a:b] - self._offsets[s]))
        if "text_states" in fields or "text_mask" in fields:
            tasks += self._text_tasks(shards, bounds, sorted_idx, order, out, alloc, out_dtype, text_length)
        self._run(tasks)
        if text_length == "ragged" and "text_states" in out and out["text_states"].dtype != out_dtype:
            converted = alloc(out["text_states"].shape, out_dtype)
            converted[...] = out["text_states"]
            out["text_states"] = converted
        for key in [k for k in ("text_states", "text_mask") if k not in fields]:
            out.pop(key, None)
        return out

    def _vector_task(
        self, shard: int, key: str, dest: np.ndarray, pos: np.ndarray, local: np.ndarray
    ) -> Callable[[], None]:
        def task() -> None:
            arr = self._array(shard, key)
            dest[pos] = arr[local]
            self._count(key, len(local) * arr.shape[1] * arr.itemsize)

        return task

    def _text_tasks(
        self,
        shards: list[int],
        bounds: np.ndarray,
        sorted_idx: np.ndarray,
        order: np.ndarray,
        out: dict[str, np.ndarray],
        alloc: Allocate,
        out_dtype: np.dtype,
        text_length: str,
    ) -> list[Callable[[], None]]:
        """Gather every row's tokens, in sorted order, into one (T, D) buffer: one contiguous extent per row."""
        spans = [self._spans(s, sorted_idx[bounds[s] : bounds[s + 1]] - self._offsets[s]) for s in shards]
        lengths = np.concatenate([ln for _, ln in spans]) if spans else np.zeros(0, np.int64)
        total = int(lengths.sum())
        width = int(self.text_state_dim or 0)
        ragged = text_length == "ragged"
        store_dtype = np.dtype(self.dtype)
        # ragged output is final (so it must be allocated by the caller's allocator); else an intermediate
        states = (alloc if ragged and out_dtype == store_dtype else _default_allocate)((total, width), store_dtype)
        mask = (alloc if ragged else _default_allocate)((total,), np.dtype(bool))
        padded = None
        if ragged:
            out.update(text_states=states, text_mask=mask, text_lengths=lengths, text_rows=order)
        else:  # each task also scatters its tokens into the (n, L, D) batch, zero / False after each row
            length = int(self.text_seq_len or 0) if text_length == "fixed" else int(lengths.max(initial=0))
            padded = (alloc((len(order), length, width), out_dtype), alloc((len(order), length), np.dtype(bool)))
            padded[0][...] = 0
            padded[1][...] = False
            out.update(text_states=padded[0], text_mask=padded[1])
        tasks = []
        target = max(1, total // (2 * self.read_threads))  # ~2 tasks per thread, split by tokens
        first_token = first_row = 0
        for s, (starts, lens) in zip(shards, spans, strict=True):
            ends = np.cumsum(lens)
            cuts = np.searchsorted(ends, np.arange(target, int(ends[-1]) if len(ends) else 0, target), side="right")
            row_bounds = np.unique(np.concatenate([[0], cuts, [len(lens)]]))
            for a, b in zip(row_bounds[:-1], row_bounds[1:], strict=True):
                lo = first_token + (int(ends[a - 1]) if a else 0)
                rows = order[first_row + a : first_row + b]
                tasks.append(self._token_task(s, starts[a:b], lens[a:b], states, mask, lo, padded, rows))
            first_token += int(ends[-1]) if len(ends) else 0
            first_row += len(lens)
        return tasks

    def _token_task(
        self,
        shard: int,
        starts: np.ndarray,
        lens: np.ndarray,
        states: np.ndarray,
        mask: np.ndarray,
        lo: int,
        padded: tuple[np.ndarray, np.ndarray] | None,
        rows: np.ndarray,
    ) -> Callable[[], None]:
        def task() -> None:
            flat_states, flat_mask = self._token_arrays(shard)
            first = np.cumsum(lens) - lens
            tokens = np.repeat(starts - first, lens) + np.arange(int(lens.sum()), dtype=np.int64)
            hi = lo + len(tokens)
            self._read_rows(shard, flat_states, starts, lens, states[lo:hi], tokens)
            np.take(flat_mask, tokens, axis=0, out=mask[lo:hi])
            self._count("text_states", states[lo:hi].nbytes)
            self._count("text_mask", len(tokens))
            if padded is not None:
                row_of, position = token_positions(rows, lens)
                padded[0][row_of, position] = states[lo:hi]
                padded[1][row_of, position] = mask[lo:hi]

        return task

    def _read_rows(
        self, shard: int, flat: np.ndarray, starts: np.ndarray, lens: np.ndarray, dest: np.ndarray, tokens: np.ndarray
    ) -> None:
        """Each row's tokens (one contiguous extent of the file) straight into ``dest`` with one pread per row.

        Why not the memory map: a cold random fault reads 4 KiB at a time once the kernel sees random access (a
        64 KB row took ~15 synchronous reads), while one pread per row is one request of the row's size, and
        preads from several reader threads give the disk queue depth; warm, a pread is one memcpy from the page
        cache without page-table faults. Measured here (8 threads, 1.2 GB ragged file): 2.4x (cold) and 1.6x (warm)
        the mapped gather.
        """
        if not (isinstance(flat, np.memmap) and flat.flags.c_contiguous):
            np.take(flat, tokens, axis=0, out=dest)
            return
        fd = self._fd(shard)
        token_bytes = flat.shape[1] * flat.itemsize
        out = memoryview(dest.reshape(-1).view(np.uint8))
        ends = np.cumsum(lens) * token_bytes
        firsts = (ends - lens * token_bytes).tolist()
        for offset, first, end in zip((flat.offset + starts * token_bytes).tolist(), firsts, ends.tolist(), strict=True):
            if first != end and os.preadv(fd, [out[first:end]], offset) != end - first:
                raise StoreError(
                    f"store {self.path}: shard {self._shards[shard]['name']}: text_states.npy is shorter than its "
                    "rows (truncated or damaged; rerun embed into a new folder)"
                )

    def _fd(self, shard: int) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.path / self._shards[shard]["name"] / "text_states.npy", os.O_RDONLY)
            return fd

    def _meta_rows(self, shard: int) -> list[dict[str, str]]:
        rows = self._meta.get(shard)
        if rows is None:
            with open(self.path / self._shards[shard]["name"] / META) as f:
                rows = [json.loads(line) for line in f]
            self._meta[shard] = rows
        return rows

    def meta(self, indices: Iterable[int] | np.ndarray) -> list[dict[str, str]]:
        """The {"id", "caption", "source"} records of the given rows."""
        idx = self._indices(indices)
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        return [
            self._meta_rows(int(s))[int(i - self._offsets[s])] for i, s in zip(idx, shard_of, strict=True)
        ]

    def captions(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        return [m["caption"] for m in self.meta(indices)]

    def row_ids(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        return [m["id"] for m in self.meta(indices)]

    def caption_ids(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """int64 per row, equal for equal caption text (a hash, so stable across stores)."""
        if self._caption_ids is None:
            self._caption_ids = self._concat("caption_ids").astype(np.int64)
        return self._caption_ids[self._indices(indices)]

    def iter_batches(
        self,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 16_384,
        block_rows: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        fields: Sequence[str] | None = None,
        dtype: str | None = "float32",
        text_length: str = "fixed",
        buffers: BufferRing | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of shuffled batches read almost sequentially, for stores larger than the page cache.

        Contiguous blocks of ``block_rows`` rows are visited in a seeded random order (block b goes to rank
        b % world_size, so ranks never overlap) and their rows mixed through a ``shuffle_buffer``-row buffer, as
        webdataset shuffles streamed shards. Every row of the split appears exactly once per epoch across ranks;
        batches carry their global row ``indices``. Plain ``get_batch`` on random indices is the exact-shuffle path.
        ``fields``, ``dtype`` and ``text_length`` are passed to ``get_batch``; with ``buffers`` each batch is read
        into the ring's next buffers (valid until the ring comes round).
        """
        read = {"fields": fields, "dtype": dtype, "text_length": text_length}
        rng = np.random.default_rng([seed, epoch])
        rows = self.split_indices(split)
        blocks = np.split(rows, np.searchsorted(rows, np.arange(block_rows, len(self), block_rows)))
        order = rng.permutation(len(blocks))[rank::world_size]
        buffer = np.zeros(0, dtype=np.int64)
        for b in order:
            buffer = np.concatenate([buffer, blocks[b]])
            while len(buffer) >= max(shuffle_buffer, batch_size):
                pick = rng.choice(len(buffer), size=batch_size, replace=False)
                yield self._batch_with_indices(buffer[pick], read, buffers)
                buffer = np.delete(buffer, pick)
        buffer = buffer[rng.permutation(len(buffer))]
        for start in range(0, len(buffer), batch_size):
            part = buffer[start : start + batch_size]
            if len(part) == batch_size or not drop_last:
                yield self._batch_with_indices(part, read, buffers)

    def _batch_with_indices(
        self, indices: np.ndarray, read: dict[str, Any], buffers: BufferRing | None
    ) -> dict[str, np.ndarray]:
        batch = self.get_batch(indices, **read, allocate=None if buffers is None else buffers.batch())
        batch["indices"] = indices
        return batch

    # --- integrity ---------------------------------------------------------------------------------------------
    def _validate_text(self, shard: int, rows: int, where: str) -> None:
        """Shapes of the text arrays for the layout; ragged offsets must start at 0, never fall, and end at T."""
        states, mask = self._array(shard, "text_states"), self._array(shard, "text_mask")
        length, width = int(self.text_seq_len or 0), int(self.text_state_dim or 0)
        if self.text_layout == "padded":
            if states.shape != (rows, length, width) or mask.shape != (rows, length):
                raise StoreError(
                    f"{where}: text arrays have shapes {states.shape} and {mask.shape}, expected "
                    f"{(rows, length, width)} and {(rows, length)}"
                )
        else:
            offsets = np.asarray(self._array(shard, "text_offsets"))
            steps = np.diff(offsets)
            if (
                offsets.shape != (rows + 1,)
                or offsets[0] != 0
                or steps.min(initial=0) < 0
                or steps.max(initial=0) > length
                or states.shape != (int(offsets[-1]), width)
                or mask.shape != (int(offsets[-1]),)
            ):
                raise StoreError(
                    f"{where}: ragged text arrays are inconsistent (offsets {offsets.shape}, states {states.shape}, "
                    f"mask {mask.shape}, {rows} rows of at most {length} tokens)"
                )
        _check_finite(states, f"{where}: text_states.npy")

    def validate(self, checksums: bool = True) -> None:
        """Raise StoreError naming the shard and problem: empty store, missing file, bad shape, NaN/Inf, checksum."""
        if len(self) == 0:
            raise StoreError(f"store {self.path} is empty (0 rows)")
        for i, shard in enumerate(self._shards):
            name, rows = shard["name"], shard["rows"]
            where = f"store {self.path}: shard {name}"
            for file in shard["sha256"]:
                if not (self.path / name / file).is_file():
                    raise StoreError(f"{where}: missing {file}")
            if rows:
                for key in ("image_embeds", "text_embeds", "row_hash", "caption_ids"):
                    arr = self._array(i, key)
                    if arr.shape[0] != rows:
                        raise StoreError(f"{where}: {key}.npy has {arr.shape[0]} rows, manifest says {rows}")
                    if key in FLOAT_ARRAYS:
                        _check_finite(arr, f"{where}: {key}.npy")
                if self.has_text_states:
                    self._validate_text(i, rows, where)
            if checksums:
                for file, digest in shard["sha256"].items():
                    if sha256_file(self.path / name / file) != digest:
                        raise StoreError(f"{where}: checksum mismatch in {file} (file changed or corrupt)")


def _check_finite(arr: np.ndarray, where: str, chunk: int = 4096) -> None:
    for start in range(0, arr.shape[0], chunk):
        if not np.isfinite(arr[start : start + chunk]).all():
            raise StoreError(f"{where} contains NaN or Inf")


def store_settings(
    *,
    clip_id: str,
    clip_revision: str,
    image_dim: int,
    text_dim: int,
    normalized: bool,
    dtype: str = "fp16",
    text_seq_len: int | None = None,
    text_state_dim: int | None = None,
    val_fraction: float = 0.05,
    source: dict[str, Any] | None = None,
    shard_size: int | None = None,
    text_layout: str = "ragged",
) -> dict[str, Any]:
    """The settings a store is pinned to (see StoreWriter); text states are stored when text_seq_len is given.

    ``text_layout`` ``ragged`` (default) keeps each row's states up to its last unmasked token; ``padded`` is the
    version-1 layout (all ``text_seq_len`` states), kept for comparisons and for stores started by version 1.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise StoreError(f"val fraction must be in [0, 1), got {val_fraction}")
    if text_layout not in LAYOUTS:
        raise StoreError(f"text layout must be one of {LAYOUTS}, not {text_layout!r}")
    return {
        "clip_id": clip_id,
        "clip_revision": clip_revision,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "text_states": text_seq_len is not None,
        "text_seq_len": None if text_seq_len is None else int(text_seq_len),
        "text_state_dim": None if text_state_dim is None else int(text_state_dim),
        "dtype": DTYPES.get(dtype) or _bad_dtype(dtype),
        "normalized": bool(normalized),
        "val_fraction": float(val_fraction),
        "source": source,
        "shard_size": shard_size,
        "text_layout": text_layout if text_seq_len is not None else None,
    }


def write_store(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    meta: list[dict[str, str]],
    shard_size: int = 10_000,
    command: str | None = None,
    **settings: Any,
) -> EmbeddingStore:
    """Write in-memory embeddings as a finished store (for generated data such as the shapes world).

    ``arrays`` holds image_embeds, text_embeds and optionally text_states + text_mask, row-aligned with ``meta``
    ({"id", "caption", "source"}); ``settings`` are store_settings' keywords (dims are taken from the arrays).
    """
    n = len(meta)
    states = arrays.get("text_states")
    cfg = store_settings(
        image_dim=arrays["image_embeds"].shape[1],
        text_dim=arrays["text_embeds"].shape[1],
        text_seq_len=None if states is None else states.shape[1],
        text_state_dim=None if states is None else states.shape[2],
        shard_size=shard_size,
        **settings,
    )
    writer = StoreWriter(path, cfg)
    starts = list(range(0, n, shard_size)) or [0]
    for i, start in enumerate(starts):
        part = {k: np.asarray(v[start : start + shard_size]) for k, v in arrays.items()}
        writer.write_shard(i, part, meta[start : start + shard_size])
    writer.finalize(len(starts), {"command": command})
    return EmbeddingStore(path)

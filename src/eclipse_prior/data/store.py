"""Sharded, memory-mapped embedding store: CLIP vectors computed once, read by training and evaluation.

Layout of a store folder::

    manifest.json           format/version, CLIP id+revision, dims, dtype, normalized flag, rows, shards with
                            per-file sha256, split rule, source, creation command, skip/truncation summary
    shard-00000/
        image_embeds.npy    (n, E)     fp16 or fp32
        text_embeds.npy     (n, E')    pooled projected text embeddings
        text_states.npy     (n, L, D)  optional per-token last_hidden_state
        text_mask.npy       (n, L)     optional bool tokenizer mask
        row_hash.npy        (n,)       uint64 hash of the row id (drives the train/val split)
        caption_ids.npy     (n,)       int64 hash of the caption text (equal captions -> equal ids)
        meta.jsonl          one {"id", "caption", "source"} per row
        shard.json          rows, checksums and this shard's skip/truncation counts

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
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eclipse_prior.errors import StoreError
from eclipse_prior.outputs import LOCK_NAME, write_json_atomic

FORMAT = "eclipse-prior-store"
VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = ".embed-settings.json"  # written when a store is started; removed once the manifest exists
SHARD_INFO = "shard.json"
META = "meta.jsonl"
DTYPES = {"fp16": "float16", "fp32": "float32", "float16": "float16", "float32": "float32"}
SPLIT_RULE = "val if (uint64 of the first 8 bytes, big-endian, of sha256(row id)) / 2**64 < val_fraction"
FLOAT_ARRAYS = ("image_embeds", "text_embeds", "text_states")
NORM_TOLERANCE = 1e-2


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
            shards.append({"name": info["name"], "rows": info["rows"], "sha256": info["sha256"]})
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


class EmbeddingStore:
    """Read-only, memory-mapped view of a finished store; every vector comes out as float32."""

    def __init__(self, path: str | os.PathLike) -> None:
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
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise StoreError(
                f"store {self.path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')} "
                f"is not {FORMAT} v{VERSION}"
            )
        _check_manifest(self.path, self.manifest)
        self._shards = self.manifest["shards"]
        self._offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self._shards])]).astype(np.int64)
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._meta: dict[int, list[dict[str, str]]] = {}
        self._hash: np.ndarray | None = None
        self._caption_ids: np.ndarray | None = None

    # --- description -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, rows={len(self)}, clip={self.clip_id!r}, dtype={self.dtype})"
        )

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

    # --- access ------------------------------------------------------------------------------------------------
    def _array(self, shard: int, key: str) -> np.ndarray:
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

    def get_batch(self, indices: Iterable[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows gathered across shards in the given order: float32 vectors, bool text_mask."""
        idx = self._indices(indices)
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for key in self.array_names:
            tail = {
                "image_embeds": (self.image_dim,),
                "text_embeds": (self.text_dim,),
                "text_states": (self.text_seq_len, self.text_state_dim),
                "text_mask": (self.text_seq_len,),
            }[key]
            out[key] = np.empty((len(idx), *tail), dtype=bool if key == "text_mask" else np.float32)
        for shard in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == shard)
            local = idx[sel] - self._offsets[shard]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            for key in self.array_names:
                out[key][sel[order]] = self._array(int(shard), key)[local[order]]
        return out

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
    ) -> Iterator[dict[str, np.ndarray]]:
        """One epoch of shuffled batches read almost sequentially, for stores larger than the page cache.

        Contiguous blocks of ``block_rows`` rows are visited in a seeded random order (block b goes to rank
        b % world_size, so ranks never overlap) and their rows mixed through a ``shuffle_buffer``-row buffer, as
        webdataset shuffles streamed shards. Every row of the split appears exactly once per epoch across ranks;
        batches carry their global row ``indices``. Plain ``get_batch`` on random indices is the exact-shuffle path.
        """
        rng = np.random.default_rng([seed, epoch])
        rows = self.split_indices(split)
        blocks = np.split(rows, np.searchsorted(rows, np.arange(block_rows, len(self), block_rows)))
        order = rng.permutation(len(blocks))[rank::world_size]
        buffer = np.zeros(0, dtype=np.int64)
        for b in order:
            buffer = np.concatenate([buffer, blocks[b]])
            while len(buffer) >= max(shuffle_buffer, batch_size):
                pick = rng.choice(len(buffer), size=batch_size, replace=False)
                yield self._batch_with_indices(buffer[pick])
                buffer = np.delete(buffer, pick)
        buffer = buffer[rng.permutation(len(buffer))]
        for start in range(0, len(buffer), batch_size):
            part = buffer[start : start + batch_size]
            if len(part) == batch_size or not drop_last:
                yield self._batch_with_indices(part)

    def _batch_with_indices(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.get_batch(indices)
        batch["indices"] = indices
        return batch

    # --- integrity ---------------------------------------------------------------------------------------------
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
                for key in (*self.array_names, "row_hash", "caption_ids"):
                    arr = self._array(i, key)
                    if arr.shape[0] != rows:
                        raise StoreError(f"{where}: {key}.npy has {arr.shape[0]} rows, manifest says {rows}")
                    if key in FLOAT_ARRAYS:
                        for start in range(0, rows, 4096):
                            if not np.isfinite(arr[start : start + 4096]).all():
                                raise StoreError(f"{where}: {key}.npy contains NaN or Inf")
            if checksums:
                for file, digest in shard["sha256"].items():
                    if sha256_file(self.path / name / file) != digest:
                        raise StoreError(f"{where}: checksum mismatch in {file} (file changed or corrupt)")


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
) -> dict[str, Any]:
    """The settings a store is pinned to (see StoreWriter); text states are stored when text_seq_len is given."""
    if not 0.0 <= val_fraction < 1.0:
        raise StoreError(f"val fraction must be in [0, 1), got {val_fraction}")
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

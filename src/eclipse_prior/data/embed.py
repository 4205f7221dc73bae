"""``embed``: turn an image-text source into an embedding store with a frozen CLIP, once, resumably, in parallel.

Decoding, resizing and tokenizing run in DataLoader worker processes while the main process only runs the CLIP
forward passes, so throughput approaches the encoder's own. Each source unit becomes one shard, written
atomically; a rerun skips finished shards, and because units and batches depend only on the source, a resumed
run and an N-process run (``torchrun`` / ``accelerate launch``: rank r takes units r, r+N, ...) write the same
store as one uninterrupted process. Rank 0 writes the manifest once every shard exists.
"""

from __future__ import annotations

import inspect
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eclipse_prior import outputs
from eclipse_prior.data.embed_guard import check_out, check_resume, wait_for_fingerprint, write_fingerprint
from eclipse_prior.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, RejectedImage, decode_image
from eclipse_prior.data.sources import Record, Source, Unit, open_source
from eclipse_prior.data.store import DTYPES, TYPICAL_TEXT_TOKENS, StoreWriter, merge_counts, store_settings
from eclipse_prior.data.text import encodable
from eclipse_prior.encoders.clip import ClipBundle, clip_fingerprint, load_clip, tokenize
from eclipse_prior.errors import ConfigError, StoreError
from eclipse_prior.outputs import LOCK_NAME, claim_dir

DEFAULT_SHARD_SIZE = 10_000
SHARD_BYTES_TARGET = 1 << 30  # with text states, shrink the default shard so one shard buffers in ~1 GiB
ENCODER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def row_bytes(
    embed_dim: int,
    dtype: str,
    seq_len: int | None = None,
    state_dim: int | None = None,
    text_tokens: float | None = None,
) -> int:
    """Bytes one store row takes on disk (vectors, hashes; per-token states and mask when given).

    ``text_tokens``: tokens kept per row in the compact layout (plus its 8-byte offset); None: all ``seq_len``
    (the padded layout, and the most a compact row can take).
    """
    size = np.dtype(DTYPES[dtype]).itemsize
    total = 2 * embed_dim * size + 16
    if seq_len:
        if text_tokens is None:
            total += seq_len * (state_dim or 0) * size + seq_len
        else:
            total += round(min(text_tokens, seq_len) * ((state_dim or 0) * size + 1)) + 8
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# a slow unit (e.g. a remote tar) must not stall the others; DataLoader has `in_order` from torch 2.6
_UNORDERED = {"in_order": False} if "in_order" in inspect.signature(DataLoader).parameters else {}


def _identity(x: Any) -> Any:
    return x


class _UnitBatches(IterableDataset):
    """Yields ready-to-encode batches; each worker owns whole units, so batches never straddle shards."""

    def __init__(
        self,
        source: Source,
        units: list[Unit],
        batch_size: int,
        tokenizer: Any,
        max_length: int,
        image_processor: Any,
        image_limits: dict[str, int] | None = None,
    ) -> None:
        self.source, self.units, self.batch_size = source, units, batch_size
        self.tokenizer, self.max_length, self.image_processor = tokenizer, max_length, image_processor
        self.image_limits = image_limits or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[wid::nw]:
            yield from self._unit(unit)

    def _pixels(self, payload: Any) -> torch.Tensor:
        """Decode one image (the package's one decoder) and preprocess it at once, so a batch holds model-sized
        pixels, never full-resolution images."""
        image = decode_image(payload, **self.image_limits)
        try:
            return self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        except Exception as err:  # an image PIL decoded but the processor cannot take (e.g. 1 x 100000)
            raise RejectedImage("unprocessable_image", type(err).__name__) from err

    def _unit(self, unit: Unit) -> Iterator[dict[str, Any]]:
        records: list[Record] = []
        pixels: list[torch.Tensor] = []
        seen = 0
        for rec in self.source.records(unit):
            seen += 1
            fields = (rec.id, rec.caption, rec.source)
            rec.id, rec.caption, rec.source = (encodable(x) for x in fields)
            if (rec.id, rec.caption, rec.source) != fields:
                unit.notes["text_with_invalid_unicode_escaped"] += 1
            if rec.bad:
                unit.skipped[rec.bad] += 1
                continue
            if not rec.caption:
                unit.skipped["empty_caption"] += 1
                continue
            if not self.source.precomputed:
                try:
                    pixels.append(self._pixels(rec.payload))
                except RejectedImage as err:
                    unit.skipped[err.reason] += 1
                    continue
            records.append(rec)
            if len(records) == self.batch_size:
                yield self._batch(unit, records, pixels, seen, final=False)
                records, pixels, seen = [], [], 0
        yield self._batch(unit, records, pixels, seen, final=True)

    def _batch(
        self, unit: Unit, records: list[Record], pixels: list[torch.Tensor], seen: int, final: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"unit": unit.index, "final": final, "seen": seen}
        if final:
            out["skipped"] = dict(unit.skipped)
            out["notes"] = dict(unit.notes)
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        if records and self.source.precomputed:
            for key in records[0].payload:
                out[key] = np.stack([r.payload[key] for r in records])
        if records and self.tokenizer is not None:
            out.update(tokenize(self.tokenizer, [r.caption for r in records], self.max_length))
        out["meta"] = [{"id": r.id, "caption": r.caption, "source": r.source} for r in records]
        return out


class _ShardBuffer:
    """Collects one unit's encoded rows (already in the store dtype) until the unit's last batch arrives."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.meta: list[dict[str, str]] = []
        self.seen = 0
        self.truncated = 0
        self.skipped: Counter = Counter()

    def add(self, arrays: dict[str, np.ndarray], meta: list[dict[str, str]]) -> None:
        for k, v in arrays.items():
            self.parts.setdefault(k, []).append(v)
        self.meta.extend(meta)

    def arrays(self, keys: tuple[str, ...], empty: dict[str, tuple]) -> dict[str, np.ndarray]:
        return {
            k: np.concatenate(self.parts[k]) if k in self.parts else np.zeros((0, *empty[k])) for k in keys
        }


def _distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device from torchrun / accelerate launch (single process when not launched)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.device


def embed(
    source: str | os.PathLike,
    clip: str | os.PathLike | ClipBundle,
    out: str | os.PathLike,
    *,
    text_states: bool = False,
    dtype: str = "fp16",
    batch_size: int = 64,
    shard_size: int | None = None,
    val_fraction: float = 0.05,
    num_workers: int = 2,
    device: str | None = None,
    encoder_dtype: str = "fp32",
    command: str | None = None,
    progress: bool = True,
    local_files_only: bool | None = None,
    allow_pipe_in_list: bool = False,
    allow_outside_source: bool = False,
    allow_changed_source: bool = False,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_BYTES,
    log: Callable[[str], None] = print,
) -> Path:
    """Embed SOURCE with CLIP into the store ``out`` (resuming it if a previous run was interrupted).

    The run holds an exclusive claim on ``out`` for its whole life. A resume checks that SOURCE (listing, captions,
    file sizes and times) and the CLIP weights are what the store was started with; a changed SOURCE is refused
    unless ``allow_changed_source``, which re-embeds exactly the shards whose part of SOURCE changed.
    """
    options = dict(locals())  # this call's arguments, as given, for the run below
    if dtype not in ("fp16", "fp32"):
        raise ConfigError(f"--dtype must be fp16 or fp32, not {dtype!r}")
    if encoder_dtype not in ENCODER_DTYPES:
        raise ConfigError(
            f"--encoder-dtype must be one of {', '.join(ENCODER_DTYPES)}, not {encoder_dtype!r}"
        )
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ConfigError("--batch-size and --shard-size must be positive")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {num_workers}")
    if max_image_pixels < 1 or max_image_bytes < 1:
        raise ConfigError("--max-image-pixels and --max-image-mb must be positive")
    rank, world, auto_device = _distributed()
    out = Path(out)
    if rank != 0:  # rank 0 claims the store for the whole launch; the others follow its fingerprint
        return _embed(options, rank, world, auto_device)
    check_out(out)
    new_folder = not out.exists()
    with claim_dir(out, "embed"):
        try:
            return _embed(options, rank, world, auto_device)
        except BaseException:
            if new_folder:  # failed before writing anything (bad SOURCE, CLIP, ...): leave no empty store behind
                _remove_if_only_lock(out)
            raise


def _remove_if_only_lock(folder: Path) -> None:
    try:
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
    except OSError:
        pass  # the folder stays; it holds nothing but the lock file


def _embed(opts: dict[str, Any], rank: int, world: int, auto_device: torch.device) -> Path:
    """The run itself; ``opts`` are embed()'s arguments."""
    source, clip, out, log = opts["source"], opts["clip"], Path(opts["out"]), opts["log"]
    text_states, dtype, shard_size = opts["text_states"], opts["dtype"], opts["shard_size"]
    dev = torch.device(opts["device"]) if opts["device"] else auto_device
    # peek at the source type first: clip-retrieval needs no image tower, and text only for token states
    probe = open_source(
        source,
        shard_size or DEFAULT_SHARD_SIZE,
        allow_pipe_in_list=opts["allow_pipe_in_list"],
        allow_outside_source=opts["allow_outside_source"],
        max_image_bytes=opts["max_image_bytes"],
    )
    bad_lines = getattr(probe, "bad_lines", [])
    if rank == 0:
        if bad_lines:
            shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
            log(f"skipping {len(bad_lines)} malformed line(s) of {probe.captions_file} (line {shown}): "
                "counted as bad_caption_line")
        for what, invalid in probe.text_fallbacks.items():
            log(f"warning: {what} is not valid UTF-8 ({invalid} invalid byte sequence(s)); read as cp1252 "
                "(save it as UTF-8 to silence this)")
    need_vision = not probe.precomputed
    need_text = not probe.precomputed or text_states or not getattr(probe, "has_text", True)
    if isinstance(clip, ClipBundle):
        bundle = clip
    else:
        bundle = load_clip(
            clip,
            device=dev,
            dtype=ENCODER_DTYPES[opts["encoder_dtype"]],
            text=need_text,
            vision=need_vision,
            local_files_only=opts["local_files_only"],
        )
    seq_len = bundle.max_length if text_states else None
    state_dim = bundle.text_state_dim if text_states else None
    per_row = row_bytes(bundle.embed_dim, dtype, seq_len, state_dim)  # a shard's buffer holds padded rows
    if shard_size is None:
        shard_size = max(256, min(DEFAULT_SHARD_SIZE, SHARD_BYTES_TARGET // per_row))
    if hasattr(probe, "shard_size"):
        probe.shard_size = shard_size
    src = probe
    if src.precomputed and getattr(src, "dim", bundle.embed_dim) != bundle.embed_dim:
        raise ConfigError(
            f"clip-retrieval vectors in {source} are {src.dim}-d but CLIP {bundle.name!r} embeds to {bundle.embed_dim}-d"
        )
    units = src.units()
    fingerprint = {
        "source": None,
        "units": src.fingerprints(units),
        "clip": clip_fingerprint(bundle.name, bundle.revision),
    }
    fingerprint["source"] = _digest_units(fingerprint["units"])
    settings = store_settings(
        clip_id=bundle.name,
        clip_revision=bundle.revision,
        image_dim=bundle.embed_dim,
        text_dim=bundle.embed_dim,
        normalized=src.normalized,
        dtype=dtype,
        text_seq_len=seq_len,
        text_state_dim=state_dim,
        val_fraction=opts["val_fraction"],
        source=src.describe(),
        shard_size=shard_size,
    )
    if rank == 0:
        check_resume(out, settings, fingerprint, opts["allow_changed_source"], str(source), log)
    writer = StoreWriter(out, settings, rank=rank)
    if rank == 0:
        write_fingerprint(out, fingerprint)
    else:
        wait_for_fingerprint(out, fingerprint)
    if writer.complete:
        if rank == 0:
            log(f"store {out} is already complete ({len(units)} shards); nothing to do")
        return out
    if rank == 0:
        _print_estimate(units, bundle.embed_dim, seq_len, state_dim, dtype, log)
    mine = [u for u in units if u.index % world == rank and not writer.done(u.index)]
    done_before = sum(writer.done(u.index) for u in units if u.index % world == rank)
    if done_before and rank == 0:
        log(f"resuming: {done_before} shard(s) already written, {len(mine)} to go (rank 0)")
    limits = {"max_pixels": opts["max_image_pixels"], "max_bytes": opts["max_image_bytes"]}
    _run_units(src, mine, bundle, writer, text_states, opts["batch_size"], opts["num_workers"], dev,
               opts["progress"] and rank == 0, limits)
    if rank != 0:
        return out
    _wait_for_shards(writer, len(units), log)
    command = opts["command"]
    if command is None:  # called from Python: record the call instead of a command line
        command = (
            f"eclipse_prior.data.embed.embed({str(source)!r}, {bundle.name!r}, {str(out)!r}, "
            f"text_states={text_states}, dtype={dtype!r}, batch_size={opts['batch_size']}, "
            f"shard_size={shard_size}, val_fraction={opts['val_fraction']})"
        )
    extra = {"command": command, "world_size": world, "source_fingerprint": fingerprint["source"]}
    if src.text_fallbacks:
        extra["text_not_utf8"] = dict(src.text_fallbacks)
    manifest = writer.finalize(len(units), extra)
    _print_summary(manifest, log)
    return out


def _digest_units(unit_fingerprints: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(unit_fingerprints).encode()).hexdigest()


def _print_estimate(units: list[Unit], embed_dim: int, seq_len, state_dim, dtype: str, log) -> None:
    known = [u.size for u in units if u.size is not None]
    n = sum(known)
    note = "" if len(known) == len(units) else f" (+ {len(units) - len(known)} shard(s) of unknown size)"
    per_row = row_bytes(embed_dim, dtype, seq_len, state_dim, TYPICAL_TEXT_TOKENS if seq_len else None)
    msg = f"estimated store size: {n} rows x {per_row} B = {format_bytes(n * per_row)}{note}"
    if seq_len:
        most = row_bytes(embed_dim, dtype, seq_len, state_dim)
        msg += (
            f" with text states kept up to each caption's last token ({TYPICAL_TEXT_TOKENS} tokens on average for "
            f"the T2I-CompBench prompts); at most {format_bytes(n * most)} if every caption filled all {seq_len}"
        )
    log(msg)


def _run_units(
    src: Source,
    units: list[Unit],
    bundle: ClipBundle,
    writer: StoreWriter,
    text_states: bool,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    show: bool,
    image_limits: dict[str, int] | None = None,
) -> None:
    if not units:
        return

    precomputed = src.precomputed
    has_text_vectors = precomputed and getattr(src, "has_text", False)
    tokenize_text = not has_text_vectors or text_states
    dataset = _UnitBatches(
        src,
        units,
        batch_size,
        bundle.tokenizer if tokenize_text else None,
        bundle.max_length,
        None if precomputed else bundle.image_processor,
        image_limits,
    )
    workers = min(num_workers, len(units))
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        **_UNORDERED,
    )
    keys = ("image_embeds", "text_embeds") + (("text_states", "text_mask") if text_states else ())
    store_dtype = np.dtype(writer.settings["dtype"])
    d, L, D = bundle.embed_dim, bundle.max_length, writer.settings.get("text_state_dim")
    empty = {"image_embeds": (d,), "text_embeds": (d,), "text_states": (L, D), "text_mask": (L,)}
    total = sum(u.size for u in units) if all(u.size is not None for u in units) else None
    buffers: dict[int, _ShardBuffer] = {}
    with outputs.progress(total=total, unit="item", enabled=show, desc="embed") as bar:
        for batch in loader:
            buf = buffers.setdefault(batch["unit"], _ShardBuffer())
            buf.seen += batch["seen"]
            if batch["meta"]:
                arrays = _encode(batch, bundle, text_states, precomputed, has_text_vectors, src.normalized)
                finite = np.ones(len(batch["meta"]), dtype=bool)
                for k, v in arrays.items():
                    if k != "text_mask":
                        finite &= np.isfinite(v.reshape(len(v), -1)).all(axis=1)
                buf.skipped["nonfinite_embedding"] += int((~finite).sum())
                buf.truncated += (
                    int(batch["truncated"][torch.from_numpy(finite)].sum()) if "truncated" in batch else 0
                )
                stored = {
                    k: v[finite].astype(bool if k == "text_mask" else store_dtype) for k, v in arrays.items()
                }
                buf.add(stored, [m for m, ok in zip(batch["meta"], finite, strict=True) if ok])
            bar.update(batch["seen"])
            if batch["final"]:
                skipped = merge_counts(
                    dict(batch.get("skipped", {})), {k: v for k, v in buf.skipped.items() if v}
                )
                summary = {"seen": buf.seen, "skipped": skipped, "truncated_captions": buf.truncated}
                if batch.get("notes"):
                    summary["notes"] = dict(batch["notes"])
                writer.write_shard(batch["unit"], buf.arrays(keys, empty), buf.meta, summary)
                del buffers[batch["unit"]]
    if buffers:  # a worker died without finishing its units
        raise StoreError(f"embed stopped before finishing shard(s) {sorted(buffers)}; rerun to resume")


def _encode(
    batch: dict[str, Any],
    bundle: ClipBundle,
    text_states: bool,
    precomputed: bool,
    has_text_vectors: bool,
    normalized: bool,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if precomputed:
        out["image_embeds"] = batch["image_embeds"].astype(np.float32)
    else:
        out["image_embeds"] = bundle.encode_pixels(batch["pixel_values"]).float().cpu().numpy()
    if has_text_vectors:
        out["text_embeds"] = batch["text_embeds"].astype(np.float32)
    if "input_ids" in batch:
        enc = bundle.encode_tokens(batch["input_ids"], batch["attention_mask"], with_states=text_states)
        if not has_text_vectors:
            text = enc["text_embeds"].float()
            if normalized:  # match the source's L2-normalised image vectors: never mix the two conventions
                text = torch.nn.functional.normalize(text, dim=-1)
            out["text_embeds"] = text.cpu().numpy()
        if text_states:
            out["text_states"] = enc["text_states"].float().cpu().numpy()
            out["text_mask"] = enc["text_mask"].cpu().numpy()
    return out


def _wait_for_shards(writer: StoreWriter, num_shards: int, log: Callable[[str], None]) -> None:
    """Rank 0 waits (on the file system, no collective timeout) until the other ranks' shards exist."""
    announced = False
    while not all(writer.done(i) for i in range(num_shards)):
        if not announced:
            log("waiting for the other processes' shards...")
            announced = True
        time.sleep(1.0)


def _print_summary(manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    s = manifest["summary"]
    skipped = s.get("skipped", {})
    parts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()) if v) or "none"
    log(
        f"store: {manifest['num_rows']} rows in {len(manifest['shards'])} shard(s), dtype {manifest['dtype']}, "
        f"normalized={str(manifest['normalized']).lower()}; seen {s.get('seen', 0)}, skipped: {parts}; "
        f"truncated captions: {s.get('truncated_captions', 0)}"
    )
    notes = s.get("notes", {})
    if any(notes.values()):
        log("kept with a caveat: " + ", ".join(f"{k} {v}" for k, v in sorted(notes.items()) if v))
    if manifest["normalized"]:
        log(
            "note: these vectors are L2-normalised (clip-retrieval); unCLIP decoders expect raw CLIP embeddings, "
            "so training on this store needs an explicit opt-in"
        )

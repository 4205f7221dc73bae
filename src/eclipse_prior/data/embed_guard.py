"""What ``embed`` checks before it writes into a store: the output path, and that a resume reads the same input.

A store is resumable because its shards depend only on SOURCE; that is only true while SOURCE stays the same. So
the store keeps ``.embed-source.json``: one digest per shard of what that shard reads (listing, captions, file
sizes and times) and a digest of the CLIP weights. A rerun compares them: a changed CLIP is refused (its vectors
would not match the finished shards), a changed SOURCE is refused unless ``--allow-changed-source``, which drops
exactly the shards whose part of SOURCE changed (and those beyond its new end) so they are embedded again: the
store never holds a row twice nor misses a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eclipse_prior.data.store import MANIFEST, SETTINGS, shard_name
from eclipse_prior.errors import ConfigError, StoreError
from eclipse_prior.outputs import LOCK_NAME, write_json_atomic

FINGERPRINT = ".embed-source.json"


def check_out(out: Path) -> None:
    """Refuse an --out that is a file, or a folder holding something other than a store (before claiming it)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the store (new or an earlier embed's)")
    if out.is_dir() and not ((out / MANIFEST).is_file() or (out / SETTINGS).is_file()):
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not an embedding store; choose an empty or new folder")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing_settings(out: Path) -> dict[str, Any] | None:
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:
        return manifest.get("settings")
    return _read_json(out / SETTINGS)


def check_resume(
    out: Path,
    settings: dict[str, Any],
    fingerprint: dict[str, Any],
    allow_changed_source: bool,
    source: str,
    log: Callable[[str], None],
) -> None:
    """Compare a store being resumed with the current SOURCE and CLIP; refuse or re-open changed shards."""
    existing = _existing_settings(out)
    if existing is None:
        return  # a new store
    previous = _read_json(out / FINGERPRINT)
    if previous is None:
        log(f"note: store {out} records no source fingerprint (older embed); changes to SOURCE cannot be detected")
        return
    # a store started before text_layout existed resumes in its padded layout (StoreWriter adopts it)
    if existing != {k: v for k, v in settings.items() if k in existing or k != "text_layout"}:
        return  # StoreWriter refuses with the setting that differs; change nothing here
    if previous.get("clip") != fingerprint["clip"]:
        raise StoreError(
            f"the CLIP weights at {settings['clip_id']} changed since store {out} was started; its finished shards "
            "hold the old model's vectors: use another --out (or delete the store)"
        )
    if previous.get("source") == fingerprint["source"]:
        return
    old, new = list(previous.get("units") or []), fingerprint["units"]
    stale = [i for i in range(len(old)) if i >= len(new) or old[i] != new[i]]
    what = f"{len(old)} shard(s) then, {len(new)} now, {len(stale)} of the earlier ones differ"
    if not allow_changed_source:
        raise ConfigError(
            f"SOURCE {source} changed since store {out} was started ({what}); resuming would mix old and new rows: "
            "pass --allow-changed-source to re-embed the changed shards, or use another --out"
        )
    log(f"SOURCE changed since the store was started ({what}): re-embedding those shards")
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:  # a finished store becomes an unfinished one again: settings back, manifest away
        write_json_atomic(out / SETTINGS, manifest["settings"])
        (out / MANIFEST).unlink()
    for index in stale:
        shard = out / shard_name(index)
        if shard.exists():
            doomed = out / f".tmp-r0-stale-{uuid.uuid4().hex[:8]}"
            os.replace(shard, doomed)  # atomic: the shard is either whole and current or gone
            shutil.rmtree(doomed, ignore_errors=True)


def run_token() -> str:
    """Identifies one launch: every rank of a torchrun/accelerate launch shares it, another launch does not."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    return ":".join(os.environ.get(k, "") for k in keys)


def write_fingerprint(out: Path, fingerprint: dict[str, Any]) -> None:
    """Rank 0, after any re-opened shards were dropped: the store now belongs to this SOURCE and launch."""
    write_json_atomic(out / FINGERPRINT, {**fingerprint, "run": run_token()})


def wait_for_fingerprint(out: Path, fingerprint: dict[str, Any], poll_s: float = 0.2) -> None:
    """Other ranks start only once rank 0 of their own launch has checked the store against this SOURCE."""
    token = run_token()
    while True:
        current = _read_json(out / FINGERPRINT)
        if current is not None and current.get("run") == token and current.get("source") == fingerprint["source"]:
            return
        time.sleep(poll_s)

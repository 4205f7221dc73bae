"""How every command claims and writes its outputs, so faults and concurrent runs never cost a user data.

- ``claim_dir``: an exclusive lock on an output folder (a run, a store, an export) for a command's whole life.
  The kernel releases it when the process exits, however it exits (kill -9 included), so a stale lock file
  never blocks anyone; a second command on the same folder gets a one-line error naming the holder.
- ``write_json_atomic`` / ``write_text_atomic``: a temporary file beside the target, fsync, rename over it,
  so a reader never sees half a file and a crash leaves the previous version.
- ``progress``: tqdm on a terminal; in a log (CI, nohup, a scheduler) plain lines at a fixed interval instead of
  thousands of carriage-return frames.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from eclipse_prior.errors import EclipsePriorError

LOCK_NAME = ".eclipse-prior.lock"
_HELD: set[int] = set()  # lock descriptors of the claims this process holds now


def _forget_claims_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep its parent's claims alive once the parent is gone:
    flock belongs to the open file, which the child shares, so the child drops its copy of the descriptor."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_claims_in_child)


class OutputBusyError(EclipsePriorError):
    """Another command holds the output folder."""


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def claim_dir(path: str | Path, command: str, remove_lock: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on folder ``path`` (created if missing) while the block runs.

    The lock is ``flock`` on ``path/.eclipse-prior.lock``; the file also records who holds it, so the refusal can
    name the holder. Locks are per open file description, so a second claim from the same process is refused too.
    ``remove_lock``: delete the lock file on release (an export folder is the user's, not ours). A lock file may
    thus vanish, so a claim holds only if the file it locked is still the one at the path (else it tries again).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise EclipsePriorError(f"{folder} exists and is not a folder; choose another output path")
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_NAME
    fd = _lock_current_file(lock_path, folder)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD.add(fd)
        yield folder
    finally:
        _HELD.discard(fd)
        if remove_lock:  # still held: a claim that opened this file meanwhile sees it gone and tries again
            lock_path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_current_file(lock_path: Path, folder: Path) -> int:
    """Open and flock ``lock_path``; retried while the locked file is not the one now at the path (its holder
    removed it between our open and our lock)."""
    for _ in range(100):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"{folder} is in use by {_holder(lock_path)}; wait for it to finish or choose another output folder"
            ) from None
        try:
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)
    raise OutputBusyError(f"{folder}: its lock file keeps being replaced; is another command claiming it in a loop?")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, replacing ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class _LineWriter:
    """A file for tqdm that turns its carriage-return frames into whole lines (for logs, not terminals)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Any = None, *, enabled: bool = True, log_every_s: float = 30.0,
             stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A progress bar: tqdm on a terminal, one plain line every ``log_every_s`` seconds otherwise.

    ``enabled=False`` silences it entirely (library callers such as the shapes benchmark ask for that).
    """
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_LineWriter(stream), mininterval=log_every_s, maxinterval=log_every_s,
                ascii=True, ncols=100, **kwargs)

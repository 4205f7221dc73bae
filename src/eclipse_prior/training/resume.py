"""What `train` settles before it writes to a run folder, so runs never corrupt each other or resume wrongly.

- `claim_run`: rank 0 holds `claim_dir(RUN)` for the whole run; a second `train` on the same folder gets a
  one-line error naming the holder (every rank of it, not only rank 0, so a launched job never hangs).
- `check_run_dir`: a folder that holds a run is only continued with `--resume`, and `--resume` of a folder that
  holds no run is an error (silently starting from step 0 would look like a resume and lose the user's intent);
  the settings that fix the network and the data stream must not change.
- `data_fingerprint` / `check_data_fingerprint`: the store a run trains on (manifest digest, rows, CLIP, width,
  normalisation) is recorded in run.json and checked on `--resume` (a store re-embedded in place with other rows
  would otherwise be continued silently); `--allow-changed-data` overrides.
- `load_latest_good_checkpoint`: falls back past damaged checkpoints, with a note for each.
- `truncate_metrics` / `read_metrics`: metrics.jsonl lines that do not parse (a partial last line after a kill
  or a full disk) are dropped with a note instead of stopping the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from eclipse_prior.config import config_from_mapping, load_yaml_mapping
from eclipse_prior.errors import ConfigError, EclipsePriorError
from eclipse_prior.outputs import LOCK_NAME, OutputBusyError, claim_dir, write_text_atomic
from eclipse_prior.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from eclipse_prior.training.config import TrainConfig

Log = Callable[[str], None]


def note(message: str) -> None:
    """The default log of these checks: a line on stderr."""
    print(message, file=sys.stderr)


def silent(message: str) -> None:
    """The log of ranks other than 0 (one note per run, not one per process)."""


@contextmanager
def claim_run(run_dir: Path, accelerator: Any, command: str) -> Iterator[None]:
    """Hold RUN for the block on rank 0; every rank raises if rank 0 could not claim it.

    A folder this call created is removed again if the block fails before writing anything into it, so a
    refused run leaves nothing behind.
    """
    main, world = accelerator.is_main_process, accelerator.num_processes
    created = not run_dir.exists()
    with ExitStack() as stack:
        refusal: Exception | None = None
        if main:
            try:
                stack.enter_context(claim_dir(run_dir, command))
            except (EclipsePriorError, OSError) as err:
                refusal = err
        if world > 1:  # the other ranks learn whether rank 0 holds the folder, instead of waiting on it forever
            from accelerate.utils import broadcast

            ok = broadcast(torch.tensor([refusal is None], dtype=torch.int32, device=accelerator.device))
            if not main and not bool(ok.item()):
                raise OutputBusyError(f"{run_dir}: rank 0 could not claim the run folder (see its error)")
        if refusal is not None:
            raise refusal
        try:
            yield
        except BaseException:
            if main and created:
                _remove_if_only_lock(run_dir)
            raise


def refuse_if_held(run_dir: Path) -> None:
    """The holder's one-line refusal before anything else is checked or opened (a run in progress there is the
    first thing to say); creates nothing. The claim itself (`claim_run`) is what excludes a second run."""
    import fcntl

    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable): nobody to name; claim_run decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        with ExitStack() as stack:  # claim_dir words the refusal, naming the holder
            stack.enter_context(claim_dir(run_dir, "check"))
    finally:
        os.close(fd)


def _remove_if_only_lock(folder: Path) -> None:
    try:
        if {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass  # best effort: the refusal itself is what the user needs to see


# Fields a resumed run must share with the run it continues (the network, the data stream, the objective).
# Others (steps, logging, checkpoint cadence, workers, tracker) may change on resume.
RESUME_FIXED = ("data", "objective", "preset", "init_from", "lam", "tau", "batch_size", "grad_accum", "seed",
                "pooled_only", "mixed_precision", "hard_negatives", "ridge_alpha")


def check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to start over a run without --resume, to resume a folder holding no run, or to change RESUME_FIXED."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a folder; choose another --out")
    store = Path(cfg.data).resolve()
    if run_dir.resolve() == store or store in run_dir.resolve().parents:
        raise ConfigError(f"--out {run_dir} is inside the store {cfg.data}; a run folder goes beside the store")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        if cfg.resume:
            raise ConfigError(
                f"--resume: {run_dir} holds no run to resume (no config.yaml); drop --resume to start a new run "
                "there, or name the run folder you meant"
            )
        return
    if not cfg.resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    values = load_yaml_mapping(saved_path)
    saved = vars(config_from_mapping(TrainConfig, values, str(saved_path)))  # types checked, one line if edited
    if not cfg.pooled_only and saved.get("pooled_only"):
        cfg.pooled_only = True  # it was switched on by a store without text states; the store has not changed

    def same(key: str) -> bool:
        if key == "data":  # the same store may be named by another relative/absolute path
            return Path(str(saved.get(key))).resolve() == Path(cfg.data).resolve()
        return saved.get(key) == getattr(cfg, key)

    changed = [f"{k} ({saved.get(k)!r} -> {getattr(cfg, k)!r})" for k in RESUME_FIXED if not same(k)]
    if changed:
        raise ConfigError(
            f"--resume of {run_dir} with different settings: {', '.join(changed)}; keep them or use another --out"
        )


def data_fingerprint(store: Any) -> dict[str, Any]:
    """What a resume depends on in the store: its manifest (shard checksums, rows), CLIP, widths, normalisation."""
    from eclipse_prior.data.store import MANIFEST

    return {
        "manifest_sha256": hashlib.sha256((Path(store.path) / MANIFEST).read_bytes()).hexdigest(),
        "rows": len(store),
        "train_rows": int(len(store.split_indices("train"))),
        "clip_id": store.clip_id,
        "clip_revision": store.clip_revision,
        "image_dim": store.image_dim,
        "has_text_states": store.has_text_states,
        "text_seq_len": store.text_seq_len if store.has_text_states else 0,
        "normalized": store.normalized,
    }


def read_run_info(run_dir: Path, log: Log = note) -> dict[str, Any] | None:
    """run.json as a dict; None when missing, or (with a note) when it does not parse."""
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        log(f"note: {path} does not parse ({err}); it is written anew")
        return None
    if not isinstance(info, dict):
        log(f"note: {path} does not hold an object; it is written anew")
        return None
    return info


def check_data_fingerprint(cfg: TrainConfig, run_dir: Path, current: dict[str, Any], log: Log = note) -> None:
    """On --resume: the store must be the one the run started on, unless --allow-changed-data."""
    info = read_run_info(run_dir, log=silent)
    if info is None:
        problem = f"{run_dir / 'run.json'} is missing or unreadable, so the store the run trained on cannot be checked"
    else:
        saved = info.get("data_fingerprint")
        if not isinstance(saved, dict):  # a run from before fingerprints: compare what its store summary holds
            summary = info.get("store") if isinstance(info.get("store"), dict) else {}
            saved = {k: summary[k] for k in ("rows", "train_rows", "clip_id", "image_dim", "normalized") if k in summary}
        changed = [f"{k} {saved[k]!r} -> {current.get(k)!r}" for k in saved
                   if k != "manifest_sha256" and saved[k] != current.get(k)]
        if not changed and saved.get("manifest_sha256", current["manifest_sha256"]) != current["manifest_sha256"]:
            changed = ["its manifest.json differs: shards were re-written"]
        if not changed:
            return
        problem = f"store {cfg.data} changed since the run started ({'; '.join(changed)})"
    if not cfg.allow_changed_data:
        raise ConfigError(
            f"--resume of {run_dir}: {problem}; pass --allow-changed-data to continue on it anyway, or start a new "
            "--out"
        )
    log(f"note: {problem}; continuing on it (--allow-changed-data)")


def load_latest_good_checkpoint(
    checkpoints_dir: Path, prior: Any, ema: Any, optimizer: Any, scheduler: Any, log: Log = note
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint that reads and fits; damaged newer ones are skipped with a note.

    None when there is no checkpoint yet (a run killed before its first one starts from step 0); a one-line
    error when there are checkpoints but none of them can be used.
    """
    if checkpoints_dir.exists() and not checkpoints_dir.is_dir():
        raise CheckpointError(f"{checkpoints_dir} is not a folder; move it away to resume")
    candidates = list_checkpoints(checkpoints_dir)
    problems = []
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path, prior, ema, optimizer, scheduler)
        except CheckpointError as err:
            problems.append(str(err))
            log(f"note: checkpoint {path.name} is damaged ({err}); falling back to the previous one")
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoint(s) in {checkpoints_dir} can be read (newest: {problems[0]}); "
            "restore one from a backup, or move checkpoints/ away to restart the run from step 0"
        )
    return None


def read_metrics(path: Path, log: Log | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; lines that do not parse as a JSON object with a step are skipped (counted)."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    if bad and log is not None:
        log(f"note: dropped {bad} unreadable line(s) of {path} (a partial line from an interrupted write)")
    return rows


def truncate_metrics(path: Path, step: int, log: Log = note) -> None:
    """Keep the log lines up to the checkpoint we resume from (later ones will be written again)."""
    if not path.is_file():
        return
    from eclipse_prior.evaluation.embedding_metrics import dumps_json

    keep = [row for row in read_metrics(path, log) if row["step"] <= step]
    write_text_atomic(path, "".join(dumps_json(row) + "\n" for row in keep))


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary folders a killed process left (checkpoint and prior/ writes); called while holding the claim,
    so no other process is writing them."""
    import shutil

    old_priors = sorted(run_dir.glob(".prior.old-*"))
    if old_priors and not (run_dir / "prior").exists():  # killed between the two renames of save_prior_atomic
        old_priors.pop().rename(run_dir / "prior")
    stale = [*run_dir.glob(".prior.tmp-*"), *old_priors, *(run_dir / "checkpoints").glob(".tmp-*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)

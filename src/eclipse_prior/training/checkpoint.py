"""Checkpoints as safetensors + JSON (never pickle), written atomically, plus the EMA of the weights.

A checkpoint folder ``checkpoints/step-XXXXXXXX/`` holds:
- ``model.safetensors``: the trained (raw) weights; ``ema.safetensors``: the EMA weights;
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param index>.<name>``;
- ``rng.safetensors``: the torch CPU (and CUDA, when present) generator states;
- ``state.json``: step, EMA update count, optimizer param groups and scalar state, LR-scheduler state, numpy and
  python RNG states, the data position and the world size.
It is written into a hidden temporary folder and renamed into place, so a folder named ``step-*`` is always
complete: a run killed at any moment resumes from the last complete one. A checkpoint damaged afterwards (a
truncated file, hand-edited JSON) raises `CheckpointError` when read, so a resume can fall back past it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eclipse_prior.errors import EclipsePriorError

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointError(EclipsePriorError):
    """A checkpoint folder that cannot be read back (truncated, empty or hand-edited files)."""


@contextlib.contextmanager
def safetensors_io_errors(path: Path) -> Iterator[None]:
    """safetensors reports a full disk or a file-size limit as SafetensorError("... (os error 28)"): turn those
    into the OSError they are, so the CLI says them in one line like every other I/O failure."""
    try:
        yield
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


class EMA:
    """Exponential moving average of a model's weights, kept as a float32 copy of the model.

    Our own 20 lines rather than diffusers' EMAModel: its state goes straight to safetensors (EMAModel's
    state_dict mixes tensors with python objects), and its decay warm-up ``min(decay, (1+n)/(10+n))`` makes
    short runs useful. ``decay=0`` makes the copy equal the weights, so EMA-off needs no special case.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        n = self.num_updates
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().float(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return _tensors_for_file(tensors), {"param_groups": groups, "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current torch / numpy / python RNG states, as tensors and JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-XXXXXXXX`` atomically and prune all but the ``keep`` newest checkpoints."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = checkpoints_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with safetensors_io_errors(checkpoints_dir):  # a full disk is an OSError (one line), not a SafetensorError
        try:
            tmp.mkdir()
            save_file(_tensors_for_file(model.state_dict()), tmp / "model.safetensors")
            save_file(_tensors_for_file(ema.model.state_dict()), tmp / "ema.safetensors")
            opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            rng_tensors, rng_meta = rng_state()
            save_file(_tensors_for_file(rng_tensors), tmp / "rng.safetensors")
            state = {
                "step": step,
                "ema_updates": ema.num_updates,
                "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                **extra,
            }
            (tmp / "state.json").write_text(json.dumps(state))
            for name in CHECKPOINT_FILES:  # on disk before the rename makes the folder a checkpoint
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. the final one of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a full disk or a kill: no half-written folder left behind, the older ones stay
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Folders named ``step-<number>``, oldest first; anything else there (temporary folders of killed writes,
    stray files, ``step-old``) is ignored. Whether each one still reads is for `read_checkpoint` to say."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """state.json and every tensor file of a checkpoint, read in full; `CheckpointError` if any is damaged."""
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json does not hold an object")
        for key in ("step", "ema_updates", "optimizer", "scheduler", "rng"):
            if key not in state:
                raise ValueError(f"state.json has no {key!r}")
        tensors = {name: load_file(path / name) for name in CHECKPOINT_FILES if name.endswith(".safetensors")}
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return state, tensors


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote into the given objects; returns state.json.

    Every file is read before anything is restored; a checkpoint whose files read but do not fit (other
    shapes, missing keys) raises `CheckpointError` too, possibly after restoring part of it: loading an
    earlier checkpoint afterwards restores everything again.
    """
    state, tensors = read_checkpoint(path)
    try:
        model.load_state_dict(tensors["model.safetensors"])
        ema.model.load_state_dict(tensors["ema.safetensors"])
        ema.num_updates = int(state["ema_updates"])
        optimizer.load_state_dict(_optimizer_join(tensors["optimizer.safetensors"], state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(tensors["rng.safetensors"], state["rng"])
        int(state["step"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path} does not fit this run ({str(err).splitlines()[0]})") from err
    return state

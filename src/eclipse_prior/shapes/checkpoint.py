"""Resumable training state of the shapes-world builds (CLIP, judge, decoder) in one safetensors file.

Weights, optimiser moments, RNG state and an EMA copy go in one file, replaced atomically, so a build killed
at any moment resumes exactly (no pickle: the optimiser's param groups travel as JSON in the header).
:func:`replacing_dir` does the same for a finished model folder, :func:`eclipse_prior.outputs.write_json_atomic` for a small record.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@contextmanager
def replacing_dir(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it replaces ``out`` whole, on error ``out`` is untouched."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def save_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    meta: dict,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``modules``' weights, ``optimizer``'s state, ``generator``'s state, ``ema`` and ``meta``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model.{name}.{key}"] = value.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    for key, value in (ema or {}).items():
        tensors[f"ema.{key}"] = value.cpu().contiguous()
    if generator is not None:
        tensors["rng"] = generator.get_state().cpu()
    header = {"meta": json.dumps(meta), "param_groups": json.dumps(opt["param_groups"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Inverse of :func:`save_state` (restores everything in place); returns the JSON meta (step, ...)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"model.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})
    if ema is not None:
        for key in ema:
            ema[key].copy_(tensors[f"ema.{key}"])
    if generator is not None:
        generator.set_state(tensors["rng"])
    return json.loads(header["meta"])

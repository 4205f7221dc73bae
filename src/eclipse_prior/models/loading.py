"""`load_prior`: one entry point for run dirs, exported/diffusers folders and hub ids (safetensors only)."""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from eclipse_prior.config import _check_value, read_json_object
from eclipse_prior.encoders._hf import hub_resolves, looks_like_hub_id, offline_default, quiet_transformers
from eclipse_prior.errors import ConfigError, ModelNotFoundError
from eclipse_prior.models.diffusion import DiffusionPrior
from eclipse_prior.models.eclipse import EclipsePrior
from eclipse_prior.models.linear import LinearPrior, ResidualPrior

_CLASSES: dict[str, type[EclipsePrior] | type[DiffusionPrior] | type[LinearPrior]] = {
    "EclipsePrior": EclipsePrior,
    "DiffusionPrior": DiffusionPrior,
    "LinearPrior": LinearPrior,
    "ResidualPrior": ResidualPrior,
}
_LOCAL_HINT = "pass a local folder path instead (a training run dir or an exported prior folder)"


def prior_class_for_config(
    config: dict[str, Any], source: str
) -> type[EclipsePrior] | type[DiffusionPrior] | type[LinearPrior]:
    """Pick the class from `_class_name`; the released ECLIPSE configs say "PriorTransformer".

    A PriorTransformer config with time-embedding fields is a diffusion prior in diffusers' own format
    (e.g. Kandinsky's 1B prior, which also rescales by clip_mean/clip_std): not something this library trained.
    """
    name = config.get("_class_name")
    if isinstance(name, str) and name in _CLASSES:
        return _CLASSES[name]
    if name == "PriorTransformer":
        if "time_embed_act_fn" in config or "time_embed_dim" in config:
            raise ConfigError(
                f"{source} is a diffusers PriorTransformer with a time embedding (a diffusion prior such as "
                f"Kandinsky's own), not an ECLIPSE prior; load it with diffusers"
            )
        return EclipsePrior
    raise ConfigError(f"{source}: config class {name!r} is not a prior (expected {', '.join(_CLASSES)} or PriorTransformer)")


def check_prior_config(cls: type, config: dict[str, Any], source: str) -> None:
    """The fields `cls` takes must have its types (sizes whole and not negative): a hand-edited config is one
    line naming the field here instead of a traceback from deep inside the network's constructor."""
    hints = typing.get_type_hints(cls.__init__)
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self" or name not in config or name not in hints:
            continue
        try:
            value = _check_value(name, config[name], hints[name])
        except ConfigError as err:
            raise ConfigError(f"prior {source}: config.json field {err}") from None
        if isinstance(value, int) and value < 0:
            raise ConfigError(f"prior {source}: config.json field {name} must be >= 0, got {value}")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers logs unused or missing weights itself, in many lines; the strict check below says it in one."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _local_folder(path: Path) -> Path:
    """A run dir holds the prior in `prior/`; an export/diffusers folder holds it at its root."""
    for folder in (path / "prior", path):
        if (folder / "config.json").is_file():
            if not any(folder.glob("*.safetensors")):
                raise ModelNotFoundError(
                    f"{folder} has no .safetensors weights (pickled .bin checkpoints are never loaded)"
                )
            return folder
    raise ModelNotFoundError(f"{path} holds neither config.json nor prior/config.json: not a prior folder or run dir")


def _hub_config(
    repo_id: str, local_files_only: bool | None, why: str = "offline or no such model"
) -> tuple[dict[str, Any], str | None]:
    """The config and subfolder of a hub prior: the repo root (released layout) or `prior/` (pipelines)."""
    kwargs: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
    for subfolder in (None, "prior"):
        try:
            with quiet_transformers():
                return EclipsePrior.load_config(repo_id, subfolder=subfolder, **kwargs), subfolder
        except (OSError, ValueError):
            continue
    raise ModelNotFoundError(
        f"prior {repo_id!r} was not found locally and could not be fetched from the hub ({why}); {_LOCAL_HINT}"
    )


def load_prior(
    path_or_id: str | Path,
    local_files_only: bool | None = None,
    torch_dtype: torch.dtype | None = None,
) -> EclipsePrior | DiffusionPrior:
    """Load an `EclipsePrior` or `DiffusionPrior` from a run dir, a saved/exported folder or a hub id.

    Loading is strict: missing or unexpected weights are an error, not silently initialised.
    `local_files_only=None` follows HF_HUB_OFFLINE.
    """
    source = str(path_or_id)
    path = Path(path_or_id).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": True, "output_loading_info": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if path.is_dir():
        folder = _local_folder(path)
        config = read_json_object(folder / "config.json", "restore the prior's config.json or export it again")
        target: str | Path = folder
    elif path.exists() or not looks_like_hub_id(source):
        raise ModelNotFoundError(
            f"prior folder {source!r} does not exist and is not a hub id (owner/name); pass a run dir, an export "
            "folder or a hub id"
        )
    else:
        why = "offline or no such model"
        if not local_files_only and not offline_default() and not hub_resolves():
            # cache only when the hub's host does not resolve: one line now instead of a minute of retries
            local_files_only, why = True, "the model hub is unreachable and the model is not cached"
        config, subfolder = _hub_config(source, local_files_only, why)
        target = source
        if subfolder:
            kwargs["subfolder"] = subfolder
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
    cls = prior_class_for_config(config, source)
    check_prior_config(cls, config, source)
    try:
        with _quiet_diffusers():
            model, info = cls.from_pretrained(target, **kwargs)
    except OSError as e:
        hint = ("its weights must be an intact .safetensors file (re-export the prior, or restore the file)"
                if path.is_dir() else _LOCAL_HINT)
        raise ModelNotFoundError(f"cannot load the weights of prior {source!r} ({str(e).splitlines()[0]}); {hint}") from e
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot load prior {source!r}: {str(e).splitlines()[0]}") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        details = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}" for k, v in bad.items())
        raise ConfigError(f"prior {source!r} does not match {cls.__name__}'s layout ({details})")
    return model.eval()

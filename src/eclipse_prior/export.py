"""`export_run`: a training run -> a diffusers-format prior folder with a model card, in the released layout.

The released ECLIPSE checkpoints are a bare `config.json` + `diffusion_pytorch_model.safetensors`; an export is
the same two files (EMA weights by default) plus README.md saying what data, objective and command made it.

The target may be a folder the user cares about (a cloned model repository with .git, a LICENSE, sample
images): the export claims it (`claim_dir`), writes into a temporary folder inside it and moves in only its own
three files; everything else stays. A file of the same name that an earlier export did not write (the record
`.eclipse-prior-export.json` holds the sha256 of what exports wrote) is only replaced with `overwrite=True`.

Pooled-only priors (`--pooled-only`) are not the released format: the authors' pipeline always passes per-token
text states, which these networks have no input for. They are exported with `_class_name: "EclipsePrior"` (not
"PriorTransformer", so no tool takes them for a released checkpoint) and a card saying so; `load_prior` and
every eclipse-prior pipeline load them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from eclipse_prior.errors import ConfigError
from eclipse_prior.evaluation.embedding_metrics import METRIC_DESCRIPTIONS
from eclipse_prior.outputs import claim_dir, write_json_atomic
from eclipse_prior.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
    safetensors_io_errors,
)
from eclipse_prior.training.resume import read_metrics

# What an export writes, in the order it moves them in (weights first, the card last).
EXPORT_FILES = ("diffusion_pytorch_model.safetensors", "config.json", "README.md")
EXPORT_RECORD = ".eclipse-prior-export.json"


def _last_validation(run_dir: Path) -> dict[str, Any] | None:
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("split") == "val"]
    return rows[-1] if rows else None


def _read_mapping(path: Path) -> dict[str, Any]:
    """A run's config.yaml / run.json for the card: {} when missing or damaged (the card says "?" then)."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def is_pooled_only(prior: Any) -> bool:
    return not getattr(prior, "uses_text_states", True)


def model_card(run_dir: Path, use_ema: bool, prior: Any) -> str:
    """README.md of an export: data, objective, hyper-parameters, last validation metrics and the command."""
    cfg = _read_mapping(run_dir / "config.yaml")
    run = _read_mapping(run_dir / "run.json")  # JSON is YAML
    store = run.get("store") if isinstance(run.get("store"), dict) else {}
    objective = cfg.get("objective", "?")
    if objective == "diffusion":
        layout = "the paper's Diffusion-Baseline, saved in diffusers format."
    elif type(prior).__name__ in ("LinearPrior", "ResidualPrior"):
        layout = (
            f"a `{type(prior).__name__}` (`--objective {objective}`: "
            + ("a linear map of the pooled CLIP text embedding, fitted in closed form" if objective == "ridge"
               else "the ECLIPSE network predicting a correction to a learned linear map of the pooled text embedding")
            + "), not the released ECLIPSE format: load it with `eclipse_prior.load_prior` or generate with "
            "`eclipse-prior generate --prior THIS_FOLDER` (Kandinsky v2.2 or Karlo decoder)."
        )
    elif is_pooled_only(prior):
        layout = (
            "**pooled-only**: it reads only the pooled CLIP text embedding, not the per-token states. It is saved "
            "with `_class_name: EclipsePrior`, not in the released ECLIPSE format: the authors' pipeline always "
            "passes token states, which this network has no input for. Load it with `eclipse_prior.load_prior` "
            "or generate with `eclipse-prior generate --prior THIS_FOLDER` (Kandinsky v2.2 or Karlo decoder)."
        )
    else:
        layout = "saved in the layout of the released ECLIPSE checkpoints (same config fields and weight names)."
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [eclipse-prior, unclip, text-to-image-prior]",
        "---",
        f"# {type(prior).__name__} ({objective} objective)",
        "",
        "A text-to-image prior (CLIP text embedding -> CLIP image embedding) trained with eclipse-prior, "
        + layout,
        "",
        "```python",
        "from eclipse_prior import load_prior",
        'prior = load_prior("path/to/this/folder")',
        "```",
        "",
        "## Training",
        "",
        "| field | value |",
        "|---|---|",
        f"| objective | {objective} |",
        f"| lam / tau | {cfg.get('lam')} / {cfg.get('tau')} |" if objective == "eclipse"
        else "| lam / tau | not used (projection loss only) |",
        f"| steps | {cfg.get('steps')} |",
        f"| global batch | {run.get('global_batch')} (processes: {run.get('world_size')}) |",
        f"| lr / warm-up | {cfg.get('lr')} / {cfg.get('warmup_steps')} |",
        f"| preset / parameters | {cfg.get('preset')} / {run.get('parameters')} |",
        f"| weights | {'EMA (decay ' + str(cfg.get('ema_decay')) + ')' if use_ema else 'raw (no EMA)'} |",
        f"| width / text length | {prior.config.embedding_dim} / {prior.config.num_embeddings} |",
        "",
        "## Data",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in store.items()],
        "",
        "## Metrics (last validation, EMA weights)",
        "",
    ]
    val = _last_validation(run_dir)
    if val is None:
        lines.append("No validation was run.")
    else:
        lines += [f"At step {val['step']} on the store's val split:", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {METRIC_DESCRIPTIONS.get(k, k)} | {'n/a' if v is None else f'{v:.4f}'} |"
            for k, v in val.items()
            if k not in ("step", "split")
        ]
    lines += ["", "## Command", "", "```", str(run.get("command", "unknown")), "```", ""]
    if run.get("resolved_command"):
        lines += ["Equivalent command from the resolved config:", "", "```", run["resolved_command"], "```", ""]
    return "\n".join(lines)


def _released_config(path: Path, prior: Any) -> None:
    """Match the released ECLIPSE config.json: `_class_name` "PriorTransformer" (what diffusers tools dispatch on;
    `load_prior` maps it back to EclipsePrior) and no `_name_or_path` (it would leak a local path).
    A DiffusionPrior, or a pooled-only EclipsePrior (see the module docstring), is not the released format and
    keeps its own class name.
    """
    config = json.loads(path.read_text())
    config.pop("_name_or_path", None)
    if type(prior).__name__ == "EclipsePrior" and not is_pooled_only(prior):
        config["_class_name"] = "PriorTransformer"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_record(out_dir: Path) -> dict[str, list[str]]:
    """name -> sha256s of the versions earlier exports wrote there ({} when there is no readable record)."""
    try:
        files = json.loads((out_dir / EXPORT_RECORD).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: [h for h in v if isinstance(h, str)] for k, v in files.items() if isinstance(v, list)}


def foreign_files(out_dir: Path) -> list[str]:
    """Files among EXPORT_FILES in `out_dir` that no earlier export wrote (so they are the user's)."""
    record = _export_record(out_dir)
    foreign = []
    for name in EXPORT_FILES:
        path = out_dir / name
        if path.is_symlink() or path.exists() and (not path.is_file() or _sha256(path) not in record.get(name, [])):
            foreign.append(name)
    return foreign


def _raw_weights(run_dir: Path) -> dict[str, Any]:
    """The raw weights of the newest checkpoint that reads (damaged newer ones are skipped)."""
    problems = []
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return read_checkpoint(path)[1]["model.safetensors"]
        except CheckpointError as err:
            problems.append(str(err))
    detail = f" (newest: {problems[0]})" if problems else ""
    raise ConfigError(f"{run_dir} has no readable checkpoint with raw weights{detail}; export the EMA weights instead")


def export_run(run_dir: str | Path, out_dir: str | Path, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Write RUN_DIR's prior (EMA weights, or the last checkpoint's raw ones) into `out_dir`.

    Only the export's own files are written; other files in `out_dir` are never touched, and files of the same
    names that an earlier export did not write are only replaced with `overwrite=True`.
    """
    from eclipse_prior.models import load_prior

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "prior").is_dir():
        raise ConfigError(f"{run_dir} is not a training run folder (no prior/ inside)")
    prior = load_prior(run_dir)
    if not use_ema:
        try:
            prior.load_state_dict(_raw_weights(run_dir))
        except RuntimeError as err:
            raise ConfigError(f"{run_dir}: the checkpoint's raw weights do not fit prior/ ({err})") from err
    with claim_dir(out_dir, f"export {run_dir}", remove_lock=True):
        foreign = foreign_files(out_dir)
        if foreign and not overwrite:
            raise ConfigError(
                f"--out {out_dir} already holds {', '.join(foreign)} that eclipse-prior export did not write; pass "
                "--overwrite to replace them (other files there are never touched), or choose another folder"
            )
        tmp = out_dir / f".export-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with safetensors_io_errors(out_dir):
                prior.save_pretrained(tmp, safe_serialization=True)
            _released_config(tmp / "config.json", prior)
            (tmp / "README.md").write_text(model_card(run_dir, use_ema, prior))
            written = {name: _sha256(tmp / name) for name in EXPORT_FILES}
            # the record names old and new versions while files move in, so a kill midway leaves only "ours"
            during = {name: [*_export_record(out_dir).get(name, []), digest] for name, digest in written.items()}
            write_json_atomic(out_dir / EXPORT_RECORD, {"files": during})
            for name in EXPORT_FILES:
                if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
                    shutil.rmtree(out_dir / name)  # only reached with overwrite=True
                os.replace(tmp / name, out_dir / name)
            write_json_atomic(out_dir / EXPORT_RECORD, {
                "files": {name: [digest] for name, digest in written.items()},
                "run": str(run_dir.resolve()),
                "weights": "ema" if use_ema else "raw",
            })
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

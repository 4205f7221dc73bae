"""`export_run`: a training run -> a diffusers-format prior folder with a model card, in the released layout.

The released ECLIPSE checkpoints are a bare `config.json` + `diffusion_pytorch_model.safetensors`; an export is
the same two files (EMA weights by default) plus README.md saying what data, objective and command made it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from eclipse_prior.errors import ConfigError
from eclipse_prior.evaluation.embedding_metrics import METRIC_DESCRIPTIONS
from eclipse_prior.training.checkpoint import list_checkpoints


def _last_validation(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    last = None
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("split") == "val":
                    last = row
    return last


def model_card(run_dir: Path, use_ema: bool, prior: Any) -> str:
    """README.md of an export: data, objective, hyper-parameters, last validation metrics and the command."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    store = run.get("store", {})
    objective = cfg.get("objective", "?")
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [eclipse-prior, unclip, text-to-image-prior]",
        "---",
        f"# {type(prior).__name__} ({objective} objective)",
        "",
        "A text-to-image prior (CLIP text embedding -> CLIP image embedding) trained with eclipse-prior, "
        + (
            "saved in the layout of the released ECLIPSE checkpoints (same config fields and weight names)."
            if objective != "diffusion"
            else "the paper's Diffusion-Baseline, saved in diffusers format."
        ),
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
    lines += ["", "## Command", "", "```", run.get("command", "unknown"), "```", ""]
    if run.get("resolved_command"):
        lines += ["Equivalent command from the resolved config:", "", "```", run["resolved_command"], "```", ""]
    return "\n".join(lines)


def _released_config(path: Path, prior: Any) -> None:
    """Match the released ECLIPSE config.json: `_class_name` "PriorTransformer" (what diffusers tools dispatch on;
    `load_prior` maps it back to EclipsePrior) and no `_name_or_path` (it would leak a local path).
    A DiffusionPrior export is not the released format and keeps its own class name.
    """
    config = json.loads(path.read_text())
    config.pop("_name_or_path", None)
    if type(prior).__name__ == "EclipsePrior":
        config["_class_name"] = "PriorTransformer"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_run(run_dir: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Write RUN_DIR's prior (EMA weights, or the last checkpoint's raw ones) to `out_dir`, atomically."""
    from eclipse_prior.models import load_prior

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "prior").is_dir():
        raise ConfigError(f"{run_dir} is not a training run folder (no prior/ inside)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ConfigError(f"--out {out_dir} exists and is not an export folder; choose another or remove it")
    prior = load_prior(run_dir)
    if not use_ema:
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        if not checkpoints:
            raise ConfigError(f"{run_dir} has no checkpoint with raw weights; export the EMA weights instead")
        prior.load_state_dict(load_file(checkpoints[-1] / "model.safetensors"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prior.save_pretrained(tmp, safe_serialization=True)
    _released_config(tmp / "config.json", prior)
    (tmp / "README.md").write_text(model_card(run_dir, use_ema, prior))
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir

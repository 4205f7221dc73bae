"""`eclipse-prior shapes build`: rebuild the shipped shapes-world weights by calling each part's owner function.

Parts and where they land (``--out``, default the package's ``shapes/weights``):

- ``clip``: the shapes CLIP (``shapes.clip_train.build_clip``) -> ``clip/``;
- ``judge``: the attribute/relation judge (``shapes.judge.build_judge``) -> ``judge/``;
- ``decoder``: the latent unCLIP decoder (``shapes.decoder.build_decoder``, needs ``clip/``) -> ``decoder/``;
- ``prior``: the shipped ECLIPSE prior (needs ``clip/``) -> ``prior/``, fp16 safetensors;
- ``diffusion-prior``: the Diffusion-Baseline of the same setting (needs ``clip/``) -> ``diffusion-prior/``, fp16;
  `eclipse-prior app` shows it beside ECLIPSE.

The shipped prior is the shapes benchmark's ECLIPSE configuration at seed 0 (small preset, lam 0.2, tau from
the CLIP, pooled text embedding, the same low-data training set with the held-out compositions withheld), so
the benchmark's ECLIPSE row describes it.

Runtimes of the shipped build: clip 134 s and decoder ~5.5 min (pool of 200k renders 87 s, UNet 4000 steps at
batch 512 229 s, qualification 14 s; autoencoder reused) on one H200 with ``--device cuda --workers 16``
(``scripts/shapes_gpu_build.py`` ran it); judge ~32 min and prior ~20 s on this project's 2-core CPU. The
clip and decoder configs on that CPU, from timed steps (1 thread beside another job): clip ~1 h 45 min
(0.39 step/s), UNet ~5.5 h (0.20 step/s), plus the autoencoder stages, 45 min. Each part resumes from its work
folder (``--work``, default ``./shapes-build-work``) when interrupted. ``--config F`` (:func:`part_configs`)
overrides the clip, judge and decoder configs from a YAML file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eclipse_prior.errors import ConfigError
from eclipse_prior.shapes.benchmark import (
    WEIGHTS_DIR,
    BenchmarkConfig,
    PriorSpec,
    clip_tau,
    load_run_prior,
    make_training_store,
    require,
    train_spec,
)
from eclipse_prior.shapes.checkpoint import replacing_dir
from eclipse_prior.shapes.holdout import load_holdout

PARTS: tuple[str, ...] = ("clip", "judge", "decoder", "prior", "diffusion-prior")


def build_prior(
    out_dir: str | Path,
    clip_dir: str | Path,
    work_dir: str | Path,
    holdout_file: str | None = None,
    log: Callable[[str], None] = print,
    objective: str = "eclipse",
    **overrides: Any,
) -> Path:
    """Train a shipped prior (the benchmark's setting of ``objective``, seed 0) and save it as fp16 safetensors.

    ``overrides`` change BenchmarkConfig fields (steps, train_size, preset): tests build a small one this way.
    """
    cfg = BenchmarkConfig(out=str(work_dir), holdout_file=holdout_file, **overrides)
    clip_dir = require(Path(clip_dir), "clip")
    work = Path(work_dir)
    store = make_training_store(work / "data", cfg.train_size, clip_dir, load_holdout(holdout_file), cfg.data_seed,
                                log)
    spec = PriorSpec(objective, cfg.lam if objective == "eclipse" else 0.0, 0, cfg.preset, cfg.train_size)
    run = train_spec(spec, store, work / "runs" / spec.name, cfg, clip_tau(clip_dir), log)
    prior = load_run_prior(run).to(torch.float16)
    out = Path(out_dir)
    with replacing_dir(out) as tmp:
        prior.save_pretrained(tmp, safe_serialization=True)
    return out


def part_configs(yaml_path: str | Path) -> dict[str, Any]:
    """``shapes build --config F``: a YAML mapping with optional ``clip``, ``judge`` and ``decoder`` sections, each
    a mapping of that part's config fields (``ClipTrainConfig``, ``JudgeTrainConfig``, ``DecoderConfig``)."""
    from eclipse_prior.config import config_from_mapping, load_yaml_mapping
    from eclipse_prior.shapes.clip_train import ClipTrainConfig
    from eclipse_prior.shapes.decoder import DecoderConfig
    from eclipse_prior.shapes.judge import JudgeTrainConfig

    classes = {"clip": ClipTrainConfig, "judge": JudgeTrainConfig, "decoder": DecoderConfig}
    sections = load_yaml_mapping(yaml_path)
    unknown = sorted(set(sections) - set(classes))
    if unknown:
        raise ConfigError(f"unknown section(s) in {yaml_path}: {', '.join(unknown)} (known: clip, judge, decoder)")
    return {part: config_from_mapping(classes[part], values or {}, f"{yaml_path} section {part!r}")
            for part, values in sections.items()}


def build(
    parts: Sequence[str] = PARTS,
    out_dir: str | Path = WEIGHTS_DIR,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rebuild the given parts in order (clip before decoder and prior); returns seconds per part.

    ``configs`` maps a part (clip, judge, decoder) to its config (default: that config's defaults, the shipped build).
    """
    configs = configs or {}
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)} or all")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else Path.cwd() / "shapes-build-work"
    seconds: dict[str, Any] = {}
    for part in PARTS:
        if part not in parts:
            continue
        t0 = time.time()
        log(f"building {part} -> {out / part}")
        if part == "clip":
            from eclipse_prior.shapes.clip_train import build_clip

            build_clip(out / "clip", work_dir=work / "clip", config=configs.get("clip"), log=log)
        elif part == "judge":
            from eclipse_prior.shapes.judge import build_judge

            build_judge(out / "judge", work_dir=work / "judge", config=configs.get("judge"), log=log)
        elif part == "decoder":
            from eclipse_prior.shapes.decoder import build_decoder

            build_decoder(out / "decoder", clip_path=out / "clip", work_dir=work / "decoder",
                          config=configs.get("decoder"), log=log)
        elif part == "prior":
            build_prior(out / "prior", out / "clip", work / "prior", log=log)
        else:
            build_prior(out / part, out / "clip", work / part, log=log, objective="diffusion")
        seconds[part] = round(time.time() - t0, 1)
        log(f"built {part} in {seconds[part]:.0f}s")
    return seconds

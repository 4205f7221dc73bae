"""`eclipse-prior train`: flags/YAML -> TrainConfig -> `eclipse_prior.training.train` (see trainer.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from eclipse_prior.config import add_dataclass_arguments, build_config, load_yaml_mapping
from eclipse_prior.training.config import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an ECLIPSE prior (or a baseline) on an embedding store",
        description="Train a prior. Every field can come from --config FILE.yaml; flags override the file. "
        "Runs one process, or several under torchrun / accelerate launch.",
    )
    p.add_argument("--config", help="YAML file of training fields (flags override it)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config < flags; with --resume of a run that has config.yaml: saved run < --config < flags.

    So `train --out RUN --resume [--steps N]` continues RUN without repeating the flags it was started with.
    """
    from_file = build_config(TrainConfig, None, args.config) if args.config else None
    resume = args.resume if args.resume is not None else bool(from_file and from_file.resume)
    out = args.out or (from_file.out if from_file else "")
    saved = Path(out) / "config.yaml" if out else None
    if not (resume and saved is not None and saved.is_file()):
        return build_config(TrainConfig, args, args.config)
    layered = argparse.Namespace(**vars(args))
    if args.config:  # the --config file's own fields sit between the saved run and the flags
        for name, value in load_yaml_mapping(args.config).items():
            if getattr(layered, name, None) is None:
                setattr(layered, name, value)
    layered.resume = True
    return build_config(TrainConfig, layered, saved)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.training.trainer import train

    cfg = resolve_config(args)
    # The exact command line when launched as a program; library callers get the resolved equivalent.
    command = shlex.join(["eclipse-prior", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None
    run_dir = train(cfg, command=command)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under torchrun/accelerate launch
        print(f"run folder: {run_dir} (prior weights in {run_dir / 'prior'})")
    return 0

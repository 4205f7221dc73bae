"""`eclipse-prior train`: flags/YAML -> TrainConfig -> `eclipse_prior.training.train` (see trainer.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from eclipse_prior.config import add_dataclass_arguments, build_config
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


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.training.trainer import train

    cfg = build_config(TrainConfig, args, args.config)
    # The exact command line when launched as a program; library callers get the resolved equivalent.
    command = shlex.join(["eclipse-prior", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None
    run_dir = train(cfg, command=command)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under torchrun/accelerate launch
        print(f"run folder: {run_dir} (prior weights in {run_dir / 'prior'})")
    return 0

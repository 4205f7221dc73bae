"""`eclipse-prior demo`: the README's main command (thin wrapper over eclipse_prior.shapes.demo)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` command."""
    p = subparsers.add_parser(
        "demo", help="offline end-to-end run in the shapes world: data, embed, train 3 priors, decode, grid, report"
    )
    p.add_argument("--out", default="out/demo", help="output folder (grid.png, report.md, runs, stores)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version (tiny data and network)")
    p.add_argument("--train-size", type=int, default=None, help="training pairs (default 1000)")
    p.add_argument("--steps", type=int, default=None, help="training steps per prior (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where its outputs are."""
    from eclipse_prior.shapes.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out=args.out)
    if args.train_size is not None:
        cfg.train_size = args.train_size
    if args.steps is not None:
        cfg.steps = args.steps
    cfg.threads = args.threads
    result = run_demo(cfg, progress=not args.no_progress)
    grid = result["grid"] or "(no grid: decoder not shipped yet)"
    print(f"demo finished in {result['seconds']:.0f}s: {grid}, {result['report']}")
    return 0

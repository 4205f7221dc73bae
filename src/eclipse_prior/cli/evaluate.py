"""`eclipse-prior evaluate PRIOR --data STORE`: embedding metrics of a prior, as a table and JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="embedding metrics of a prior on a store split")
    p.add_argument("prior", metavar="PRIOR", help="training run folder, export folder or hub id")
    p.add_argument("--data", required=True, help="embedding store")
    p.add_argument("--split", default="val", choices=["train", "val", "all"], help="store split (default: val)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--steps", type=int, default=25, help="diffusion prior sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, default=4.0, help="diffusion prior guidance scale (default: 4.0)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward pass (default: 256)")
    p.add_argument("--max-samples", type=int, help="score only the first N rows of the split")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.evaluation.embedding_metrics import evaluate_prior, format_metrics
    from eclipse_prior.models import load_prior

    prior = load_prior(args.prior, local_files_only=True if args.local_files_only else None)
    metrics = evaluate_prior(
        prior,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        max_samples=args.max_samples,
    )
    print(f"{args.prior} on {args.data} [{args.split}]")
    print(format_metrics(metrics))
    if args.json:
        report = {
            "prior": args.prior,
            "prior_class": type(prior).__name__,
            "data": args.data,
            "split": args.split,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance,
            "seed": args.seed,
            "metrics": metrics,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    return 0

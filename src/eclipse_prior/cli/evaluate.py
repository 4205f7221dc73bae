"""`eclipse-prior evaluate PRIOR --data STORE`: embedding metrics of a prior, as a table and JSON."""

from __future__ import annotations

import argparse
import math
import sys
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
    p.add_argument(
        "--no-verify-store",
        dest="verify_store",
        action="store_false",
        help="skip the store's checksum/finiteness check (rows read are still checked for NaN/Inf)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.data.store import EmbeddingStore
    from eclipse_prior.errors import ConfigError
    from eclipse_prior.evaluation.embedding_metrics import (
        UNDEFINED_REASONS,
        dumps_json,
        evaluate_prior,
        format_metrics,
        split_size_warning,
    )
    from eclipse_prior.models import load_prior
    from eclipse_prior.outputs import write_text_atomic

    for name in ("batch_size", "steps", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json} is a folder; name a file, e.g. {Path(args.json) / 'metrics.json'}")
    store = EmbeddingStore(args.data)
    prior = load_prior(args.prior, local_files_only=True if args.local_files_only else None)
    metrics = evaluate_prior(
        prior,
        store,
        split=args.split,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        max_samples=args.max_samples,
        verify_store=args.verify_store,
    )
    print(f"{args.prior} on {args.data} [{args.split}]")
    print(format_metrics(metrics))
    notes = []
    if (warning := split_size_warning(int(metrics["num_samples"] or 0), args.split)) is not None:
        notes.append(warning)
    if store.normalized:
        notes.append(
            "note: this store holds L2-normalised embeddings; unCLIP decoders expect raw ones, so the squared L2 "
            "column does not reflect what a decoder would see"
        )
    for note in notes:
        print(note, file=sys.stderr)
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
            "undefined": {k: UNDEFINED_REASONS.get(k, "undefined") for k, v in metrics.items() if v is None},
            "notes": notes,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, dumps_json(report, indent=2) + "\n")
    return 0

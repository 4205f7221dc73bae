"""`eclipse-prior embed SOURCE --clip ID_OR_PATH --out STORE`: precompute CLIP embeddings into a store."""

from __future__ import annotations

import argparse
import shlex


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed image-text pairs with CLIP into a sharded store (resumable; torchrun for several processes)",
        description=(
            "SOURCE: an image folder (captions.jsonl / captions.csv / a .txt per image), webdataset tar shards "
            "(path, {brace} pattern, list file, pipe: command, or a folder of .tar), or a clip-retrieval output "
            "folder (img_emb/ text_emb/ metadata/; taken as L2-normalised vectors without re-encoding images). "
            "Rerunning the same command resumes an interrupted store."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--clip", required=True, metavar="ID_OR_PATH", help="CLIP hub id or local folder")
    p.add_argument("--out", required=True, metavar="STORE", help="store folder to create or resume")
    p.add_argument("--text-states", action="store_true", help="also store per-token text states (N x 77 x D)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="store dtype (default fp16)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default 64)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="rows per shard (default 10000, smaller with --text-states)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of rows in the val split")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes (default 2)")
    p.add_argument("--device", default=None, help="encoder device (default: cuda if available, else cpu)")
    p.add_argument(
        "--encoder-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="CLIP compute dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-pipe-in-list",
        action="store_true",
        help="let pipe: lines inside a list-file SOURCE run as shell commands (refused by default: a list file "
        "shipped with a dataset could run anything; a pipe: given as SOURCE itself is always allowed)",
    )
    p.add_argument(
        "--allow-outside-source",
        action="store_true",
        help="let a captions file name images outside SOURCE (absolute paths, .., symlinks leading out); "
        "refused and counted as outside_source by default",
    )
    p.add_argument(
        "--allow-changed-source",
        action="store_true",
        help="resume although SOURCE changed since the store was started: the shards whose part of SOURCE "
        "changed are embedded again (refused by default)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="skip (and count) images with more pixels than this, read from the header before decoding "
        "(default 64 million)",
    )
    p.add_argument(
        "--max-image-mb",
        type=float,
        default=None,
        help="skip (and count) image files (and tar members) larger than this many MiB (default 100)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.data.embed import embed
    from eclipse_prior.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from eclipse_prior.errors import ConfigError

    if args.max_image_mb is not None and not 0 < args.max_image_mb < 2**40:  # also refuses nan and inf
        raise ConfigError(f"--max-image-mb must be a positive number of MiB, not {args.max_image_mb}")
    embed(
        args.source,
        args.clip,
        args.out,
        text_states=args.text_states,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        num_workers=args.num_workers,
        device=args.device,
        encoder_dtype=args.encoder_dtype,
        command=_command(args),
        progress=not args.no_progress,
        allow_pipe_in_list=args.allow_pipe_in_list,
        allow_outside_source=args.allow_outside_source,
        allow_changed_source=args.allow_changed_source,
        max_image_pixels=DEFAULT_MAX_PIXELS if args.max_image_pixels is None else args.max_image_pixels,
        max_image_bytes=DEFAULT_MAX_BYTES if args.max_image_mb is None else int(args.max_image_mb * 2**20),
    )
    return 0


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line, rebuilt from the parsed flags (recorded in the manifest)."""
    parts = ["eclipse-prior", "embed", args.source, "--clip", args.clip, "--out", args.out]
    parts += [
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--val-fraction",
        str(args.val_fraction),
    ]
    if args.shard_size is not None:
        parts += ["--shard-size", str(args.shard_size)]
    if args.text_states:
        parts.append("--text-states")
    if args.encoder_dtype != "fp32":
        parts += ["--encoder-dtype", args.encoder_dtype]
    for flag in ("allow_pipe_in_list", "allow_outside_source", "allow_changed_source"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.max_image_pixels is not None:
        parts += ["--max-image-pixels", str(args.max_image_pixels)]
    if args.max_image_mb is not None:
        parts += ["--max-image-mb", str(args.max_image_mb)]
    return shlex.join(parts)

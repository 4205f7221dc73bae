"""`eclipse-prior export RUN_DIR --out DIR`: the run's prior in the released diffusers layout + a model card."""

from __future__ import annotations

import argparse

from eclipse_prior import hub


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a training run as a diffusers prior folder with a model card")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run folder")
    p.add_argument("--out", required=True, help="export folder (config.json + safetensors + README.md)")
    p.add_argument("--no-ema", action="store_true", help="export the last checkpoint's raw weights, not the EMA")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace config.json / diffusion_pytorch_model.safetensors / README.md in --out that an earlier export "
        "did not write (other files there are never touched)",
    )
    hub.add_push_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.export import export_run

    out = export_run(args.run_dir, args.out, use_ema=not args.no_ema, overwrite=args.overwrite)
    print(f"exported {args.run_dir} -> {out} ({'raw' if args.no_ema else 'EMA'} weights)")
    if args.push_to_hub:
        url = hub.publish(args.run_dir, out, args.push_to_hub, args.private, args.license, args.dataset)
        print(f"pushed {out} to {url}")
    return 0

"""`eclipse-prior app`: the web app comparing priors side by side (optional extra: pip install 'eclipse-prior[app]')."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `app` command (gradio is imported only when it runs)."""
    p = subparsers.add_parser(
        "app",
        help="web app: several priors side by side on one prompt and seed (offline shapes world by default)",
        description=(
            "A local web page (Gradio) drawing the same prompt and seeds with several priors side by side, each "
            "column with its prior latency and total time, every image downloadable with the JSON sidecar that "
            "`generate --from-sidecar` remakes it from. Without --decoder it runs offline on the shipped shapes "
            "world: ECLIPSE, the Diffusion-Baseline and the raw text embedding. Needs the app extra: "
            "pip install 'eclipse-prior[app]'."
        ),
    )
    p.add_argument("--prior", action="append", default=[], metavar="NAME=PATH",
                   help="a prior column: run dir, export folder or hub id, named NAME (repeatable; default: the "
                        "shapes world's ECLIPSE and Diffusion-Baseline, or the decoder's released ECLIPSE prior)")
    p.add_argument("--decoder", help="kandinsky22, karlo, a hub id or a decoder folder (default: the shapes decoder)")
    p.add_argument("--clip", help="CLIP hub id or folder for the text encoder (as in generate)")
    p.add_argument("--no-text-column", action="store_true", help="leave out the raw text-embedding column")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="requests waiting at most; more are turned away with a message (default 8)")
    p.add_argument("--max-images", type=int, default=4, help="most images per column and request (default 4)")
    p.add_argument("--max-steps", type=int, default=100, help="most decoder steps per request (default 100)")
    p.add_argument("--out", help="folder for the drawn PNGs and sidecars (default: a temporary folder)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="fp16 needs a GPU")
    p.add_argument("--offline", action="store_true", help="use only local folders and the Hugging Face cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.app import launch

    launch(args)
    return 0

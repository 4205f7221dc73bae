"""`eclipse-prior app`: a local web page (Gradio) that draws one prompt with several priors side by side.

Gradio is an optional extra (``pip install 'eclipse-prior[app]'``) and is imported only here, when the app
starts; nothing else in the package imports this subpackage. The models and the drawing live in
:mod:`eclipse_prior.app.engine` (no gradio), the page in :mod:`eclipse_prior.app.page`.

Never phones home: analytics are off, the theme uses the browser's own fonts (no font CDN), and the server binds
127.0.0.1 unless ``--host`` says otherwise; a public link only with ``--share``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from eclipse_prior.errors import ConfigError

__all__ = ["default_columns", "launch", "load_engine"]


def default_columns(decoder: str | None, priors: list[str]) -> tuple[list[tuple[str, str | None]], str, str | None]:
    """(prior columns, decoder, clip default): the shapes world's parts when no decoder is named."""
    from eclipse_prior.app.engine import parse_prior_specs

    columns: list[tuple[str, str | None]] = list(parse_prior_specs(priors))
    if decoder is not None:
        return columns or [("ECLIPSE (released)", None)], decoder, None
    from eclipse_prior.shapes.benchmark import require, shipped

    clip = str(require(shipped("clip"), "clip"))
    if not columns:
        columns = [("ECLIPSE", str(require(shipped("prior"), "prior"))),
                   ("Diffusion-Baseline", str(require(shipped("diffusion-prior"), "diffusion-prior")))]
    return columns, str(require(shipped("decoder"), "decoder")), clip


def load_engine(args: argparse.Namespace) -> tuple[object, bool]:
    """The Engine for the parsed flags, and whether it is the shapes world."""
    from eclipse_prior.app.engine import Engine, Limits

    _check_numbers(args)
    columns, decoder, clip = default_columns(args.decoder, args.prior)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="eclipse-prior-app-"))
    out.mkdir(parents=True, exist_ok=True)
    shapes_world = args.decoder is None
    if shapes_world:  # the shapes benchmark's decoding settings (25 steps, guidance 3)
        from eclipse_prior.shapes.benchmark import BenchmarkConfig

        steps, guidance = BenchmarkConfig.decoder_steps, BenchmarkConfig.decoder_guidance
    else:
        steps = guidance = None
    engine = Engine(columns, decoder, args.clip or clip, out, device=args.device, dtype=args.dtype,
                    local_files_only=True if args.offline else None, text_column=not args.no_text_column,
                    limits=Limits(max_images=args.max_images, max_steps=args.max_steps),
                    default_steps=steps, default_guidance=guidance)
    return engine, shapes_world


def _check_numbers(args: argparse.Namespace) -> None:
    for name, value, low, high in (("--port", args.port, 1, 65535), ("--queue-size", args.queue_size, 1, None),
                                   ("--max-images", args.max_images, 1, None), ("--max-steps", args.max_steps, 1, None)):
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{name} must be at least {low}{f' and at most {high}' if high else ''}, got {value}")


def _check_port(host: str, port: int) -> None:
    """A one-line error now if the address cannot be bound (in use, or not this machine's)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise ConfigError(f"cannot serve on {host}:{port} ({err.strerror or err}); choose another --port or "
                          "--host") from err


def launch(args: argparse.Namespace) -> None:
    """Load the models, build the page and serve it until interrupted."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no analytics
    t0 = time.perf_counter()
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ConfigError("the app needs the app extra: pip install 'eclipse-prior[app]' "
                          f"({err.name or 'gradio'} is missing)") from err
    from eclipse_prior.app.page import build_page, theme

    _check_numbers(args)
    _check_port(args.host, args.port)  # before minutes of loading real models
    engine, shapes_world = load_engine(args)
    demo = build_page(engine, shapes_world)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    print(f"models loaded in {time.perf_counter() - t0:.1f}s; columns: "
          f"{', '.join(c.name for c in engine.columns)}", file=sys.stderr, flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False,
                    allowed_paths=[str(engine.out_dir)], theme=theme(), show_error=False, ssr_mode=False)
    except OSError as err:  # gradio: "Cannot find empty port ..." (no errno), or the address cannot be bound
        if err.errno is not None and err.filename is not None:
            raise
        raise ConfigError(f"cannot serve on {args.host}:{args.port} ({str(err).splitlines()[0][:120]}); "
                          "choose another --port or --host") from err

"""`eclipse-prior shapes build|benchmark|readout`: thin CLI over eclipse_prior.shapes.build, .benchmark, .readout."""

from __future__ import annotations

import argparse
import json
import time

from eclipse_prior.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `shapes` with its `build`, `benchmark` and `readout` subcommands."""
    p = subparsers.add_parser("shapes", help="the offline shapes world: rebuild its weights, run its benchmark")
    sub = p.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser("build", help="rebuild the shipped shapes-world weights (clip, judge, decoder, prior)")
    b.add_argument("--part", choices=["clip", "judge", "decoder", "prior", "diffusion-prior", "all"], default="all",
                   help="which part to rebuild (default all; decoder and prior need clip)")
    b.add_argument("--out", default=None, help="weights folder (default: the package's shapes/weights)")
    b.add_argument("--work", default=None, help="resumable work folder (default: ./shapes-build-work)")
    b.add_argument("--config", default=None,
                   help="YAML with optional clip/judge/decoder sections of config fields (default: the shipped build)")
    b.add_argument("--device", default=None, help="torch device of the clip and decoder builds (e.g. cuda)")
    b.add_argument("--workers", type=int, default=None,
                   help="processes rendering pools and building CLIP batches (default 1: inline)")
    b.set_defaults(func=run_build)

    m = sub.add_parser("benchmark", help="ECLIPSE vs Projection vs Diffusion-Baseline (and the objectives built to "
                       "generalise) on held-out compositions")
    m.add_argument("--out", required=True, help="output folder (results.json, results.md, plots, caches)")
    m.add_argument("--quick", action="store_true", help="smoke run (< 2 min): tiny data, 2 seeds, no ablations")
    m.add_argument("--holdout-file", default=None, help="held-out compositions, one per line (default list if absent)")
    m.add_argument("--seeds", type=int, default=None, help="seeds per prior (default 3; quick 2)")
    m.add_argument("--clip", default=None, help="shapes CLIP folder (default: shipped)")
    m.add_argument("--decoder", default=None, help="decoder folder (default: shipped)")
    m.add_argument("--judge", default=None, help="judge folder (default: shipped)")
    m.add_argument("--steps", type=int, default=None, help="training steps per prior")
    m.add_argument("--train-size", type=int, default=None, help="training pairs of the main comparison")
    m.add_argument("--decode-per-cell", type=int, default=None, help="decoded captions per category and split")
    m.add_argument("--decoder-steps", type=int, default=None, help="decoder denoising steps for the judge part")
    m.add_argument("--decoder-guidance", type=float, default=None, help="decoder guidance scale for the judge part")
    m.add_argument("--pooled-only", action="store_true",
                   help="priors read the pooled text embedding only (the previous arm); default: per-token states")
    m.add_argument("--objectives", nargs="+", default=None,
                   help="objectives of the main comparison (default: projection diffusion eclipse ridge residual "
                        "image-contrastive hard-negatives; the first three are required)")
    m.add_argument("--contrast-lam", type=float, default=None,
                   help="lam of the image-contrastive and hard-negatives objectives (default 1)")
    m.add_argument("--lams", type=float, nargs="+", default=None, help="ECLIPSE lam ablation (default 0 0.2 1 4)")
    m.add_argument("--train-sizes", type=int, nargs="+", default=None,
                   help="training-set size ablation (default 300 1500; smaller sets are prefixes of the largest)")
    m.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="training-length ablation in epochs over each training-set size (e.g. 100, the paper's "
                        "regime; default: none, only the main budget)")
    m.add_argument("--epochs-train-size", type=int, default=None,
                   help="training-set size the --epochs runs use (default: the smallest of --train-sizes)")
    m.add_argument("--ablation-objectives", nargs="+", default=None,
                   help="objectives of the size/length ablations (default projection eclipse ridge residual)")
    m.add_argument("--ablation-seeds", type=int, default=None, help="seeds of the size/length ablations (default 3)")
    m.add_argument("--second-preset", default=None, help="also ablate the network size with this preset (e.g. tiny)")
    m.add_argument("--no-judge-ablations", action="store_true", help="embedding metrics only for ablation rows")
    m.add_argument("--no-judge-text", action="store_true",
                   help="do not decode the raw text embedding row (it depends on no prior; 0.00 judge in every run)")
    m.add_argument("--no-ablations", action="store_true", help="skip the ablations")
    m.add_argument("--no-judge", action="store_true", help="skip decoding and the judge (embedding metrics only)")
    m.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    m.add_argument("--workers", type=int, default=None,
                   help="processes that train, score and decode the priors in parallel (default 1; on a 2-core "
                        "machine 2 with 1 thread each is fastest); results do not depend on it")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=run_benchmark_cmd)

    z = sub.add_parser("size-probe", help="does a benchmark prior's embedding carry which object is big?")
    z.add_argument("--out", required=True, help="a `shapes benchmark` output folder (its trained priors are probed)")
    z.add_argument("--seeds", type=int, default=3, help="seeds of each prior to probe (default 3)")
    z.add_argument("--objectives", nargs="+", default=None, help="objectives to probe (default: every one trained)")
    z.add_argument("--pooled-only", action="store_true", help="probe the pooled-only arm's priors")
    z.add_argument("--train", type=int, default=4000, help="random size scenes the read-out is trained on")
    z.set_defaults(func=run_size_probe)

    r = sub.add_parser("readout", help="how well each object's attributes can be read from the CLIP image embedding")
    r.add_argument("--clip", default=None, help="shapes CLIP folder (default: shipped)")
    r.add_argument("--train", type=int, nargs="+", default=[27_000], help="probe training-set sizes")
    r.add_argument("--test", type=int, default=3000, help="held-out scenes every probe is scored on")
    r.add_argument("--hidden", type=int, nargs="+", default=[0, 512], help="probe widths (0: linear)")
    r.add_argument("--steps", type=int, default=4000, help="probe training steps (batch 256)")
    r.add_argument("--out", default=None, help="also write the JSON here")
    r.set_defaults(func=run_readout)


def run_build(args: argparse.Namespace) -> int:
    """Rebuild the requested parts and print the seconds each took."""
    from eclipse_prior.shapes.benchmark import WEIGHTS_DIR
    from eclipse_prior.shapes.build import PARTS, build, part_configs

    parts = PARTS if args.part == "all" else (args.part,)
    configs = part_configs(args.config) if args.config else {}
    if args.device is not None or args.workers is not None:
        configs.update(_placement(configs, args.device, args.workers))
    seconds = build(parts, args.out or WEIGHTS_DIR, args.work, configs=configs)
    print(json.dumps({"seconds": seconds}))
    return 0


def _placement(configs: dict, device: str | None, workers: int | None) -> dict:
    """The clip and decoder configs with ``--device`` / ``--workers`` applied (one-line errors when unusable)."""
    import dataclasses

    import torch

    from eclipse_prior.shapes.clip_train import ClipTrainConfig
    from eclipse_prior.shapes.decoder import DecoderConfig

    changes: dict = {}
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as err:
            raise ConfigError(f"--device {device!r}: {err}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible here")
        changes["device"] = device
    if workers is not None:
        if workers < 1:
            raise ConfigError("--workers must be >= 1")
        changes["render_workers"] = workers
    clip = dataclasses.replace(configs.get("clip") or ClipTrainConfig(), **changes)
    if workers is not None:
        clip = dataclasses.replace(clip, loader_workers=workers if workers > 1 else 0)
    return {"clip": clip, "decoder": dataclasses.replace(configs.get("decoder") or DecoderConfig(), **changes)}


def run_benchmark_cmd(args: argparse.Namespace) -> int:
    """Run (or resume) the benchmark and print where the results are."""
    from eclipse_prior.shapes.benchmark import BenchmarkConfig, run_benchmark

    overrides = {
        "holdout_file": args.holdout_file, "seeds": args.seeds, "clip": args.clip, "decoder": args.decoder,
        "judge": args.judge, "steps": args.steps, "train_size": args.train_size, "threads": args.threads,
        "workers": args.workers,
        "decode_per_cell": args.decode_per_cell, "decoder_steps": args.decoder_steps,
        "decoder_guidance": args.decoder_guidance, "contrast_lam": args.contrast_lam,
        "ablation_seeds": args.ablation_seeds, "second_preset": args.second_preset,
        "epochs_train_size": args.epochs_train_size,
        **{k: tuple(v) for k, v in (("objectives", args.objectives), ("lams", args.lams),
                                    ("train_sizes", args.train_sizes), ("epochs", args.epochs),
                                    ("ablation_objectives", args.ablation_objectives)) if v is not None},
    }
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    if args.quick:
        cfg = BenchmarkConfig.quick_config(args.out, **overrides)
    else:
        cfg = BenchmarkConfig(out=args.out, **{k: v for k, v in overrides.items() if v is not None})
    asked = any(v is not None for v in (args.lams, args.train_sizes, args.epochs, args.ablation_objectives,
                                        args.second_preset, args.epochs_train_size))  # an ablation flag turns ablations on, even --quick
    cfg.ablations = (cfg.ablations or asked) and not args.no_ablations
    cfg.judge_part = not args.no_judge
    cfg.judge_ablations = not args.no_judge_ablations
    cfg.judge_text = not args.no_judge_text
    cfg.pooled_only = args.pooled_only
    t0 = time.time()
    results = run_benchmark(cfg, progress=not args.no_progress)
    print(f"wrote {cfg.out}/results.json, results.md and plots in {time.time() - t0:.0f}s")
    print(f"tau {results['tau']}; timings {json.dumps(results['timings'])}")
    return 0


def run_readout(args: argparse.Namespace) -> int:
    """Probe the CLIP image embedding and print per-attribute read-out accuracy as JSON."""
    from pathlib import Path

    from eclipse_prior.shapes.benchmark import require, shipped
    from eclipse_prior.shapes.readout import probe_clip

    if min(args.train) < 1 or args.test < 1 or args.steps < 1 or min(args.hidden) < 0:
        raise ConfigError("--train, --test and --steps must be >= 1, --hidden >= 0")
    clip = require(Path(args.clip) if args.clip else shipped("clip"), "clip")
    if args.out:  # a missing folder must not lose minutes of probing at the end
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = probe_clip(clip, n_train=args.train, n_test=args.test, hidden=args.hidden, steps=args.steps)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def run_size_probe(args: argparse.Namespace) -> int:
    """Probe the size binding in a benchmark folder's priors; writes size_probe.json/.md there and prints the table."""
    import dataclasses
    from pathlib import Path

    from eclipse_prior.outputs import write_json_atomic, write_text_atomic
    from eclipse_prior.shapes.benchmark import OBJECTIVE_LABELS, Benchmark, BenchmarkConfig
    from eclipse_prior.shapes.size_probe import size_binding_probe, size_probe_markdown

    if args.seeds < 1 or args.train < 10:
        raise ConfigError("--seeds must be >= 1 and --train >= 10")
    if not (Path(args.out) / "runs").is_dir():  # before anything is loaded, rendered or written there
        raise ConfigError(f"{args.out} is not a `shapes benchmark` output folder (no runs/); run the benchmark first")
    saved = Path(args.out) / "results.json"  # the folder's own settings (eval set, preset, steps) when it has them
    fields = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    config = {k: tuple(v) if isinstance(v, list) else v
              for k, v in (json.loads(saved.read_text())["config"] if saved.is_file() else {}).items() if k in fields}
    config.update(out=args.out, pooled_only=args.pooled_only or config.get("pooled_only", False))
    bench = Benchmark(BenchmarkConfig(**config), log=lambda s: None, progress=False)
    runs = {}
    for objective in args.objectives or list(OBJECTIVE_LABELS):
        if objective not in OBJECTIVE_LABELS:
            raise ConfigError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVE_LABELS)}")
        dirs = [Path(args.out) / "runs" / bench.spec(objective, s).name for s in range(args.seeds)]
        if all((d / "prior").is_dir() for d in dirs):
            runs[OBJECTIVE_LABELS[objective]] = dirs
    if not runs:
        raise ConfigError(f"{args.out} holds no finished benchmark priors for {args.seeds} seed(s)")
    report = size_binding_probe(bench, runs, n_train=args.train)
    write_json_atomic(Path(args.out) / "size_probe.json", report)
    table = size_probe_markdown(report)
    write_text_atomic(Path(args.out) / "size_probe.md", table + "\n")
    print(table)
    return 0

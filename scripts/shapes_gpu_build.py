"""Rebuild the shapes CLIP and decoder UNet on one GPU inside a fixed wall-clock budget.

Why a script: a lent GPU comes for minutes, once, so the build must size itself to the time it has. It
calibrates the CLIP and UNet step rates at the GPU batch sizes, sets each run's step count from its time budget,
trains the CLIP, probes it against the shipped one with the same read-out (``shapes.readout``), keeps whichever
reads two-object shape better (colour not worse), then trains the decoder's UNet against the kept CLIP and
qualifies it (``build_decoder``). The movq autoencoder does not depend on the CLIP and is reused from
``--movq`` (the shipped decoder's). Everything lands in ``--out`` (``clip/``, ``decoder/``, ``gpu_build.json``).

    python scripts/shapes_gpu_build.py --out OUT --work /tmp/work --clip-budget-s 110 --unet-budget-s 240

The shipped weights came from this script on one H200 (``--deadline-s 515``) plus a second call that resumed the
UNet to 4000 steps: the read-out, then embedding on the CPU, took 145 s instead of the ~45 planned, so the
deadline cut the first UNet run to 540 steps (``weights/decoder/build.json``, "provenance"). The read-out now
embeds on ``--device``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batches are tokenised in DataLoader workers

from eclipse_prior.shapes.clip_train import ClipTrainConfig, build_clip, train_clip
from eclipse_prior.shapes.decoder import DEFAULT_DECODER_DIR, DecoderConfig, build_decoder, train_unet
from eclipse_prior.shapes.readout import probe_clip

SHIPPED = DEFAULT_DECODER_DIR.parent

#: The shipped builds' settings (the configs' defaults); step counts are set from the calibrated rates.
CLIP = ClipTrainConfig(loader_workers=12)
DECODER = DecoderConfig(checkpoint_every_s=60.0)


def decoder_schedule(cfg: DecoderConfig, steps: int) -> DecoderConfig:
    """The shipped schedule's shape scaled to ``steps``: peak rate to 40%, lower rate, linear tail from 70%."""
    return replace(cfg, unet_steps=steps, unet_lr_drop_at=int(0.4 * steps), unet_lr_decay_from=int(0.7 * steps))


def rate(run, warmup: int, last: int) -> float:
    """Steps per second of a resumable run (``run(stop_at, log)``) from ``warmup`` to ``last``, as it logs it.

    The training loops log their rate since they (re)started, after loading: setup time is not counted.
    """
    run(warmup, lambda msg: None)
    lines: list[str] = []
    run(last, lines.append)
    words = [line.split() for line in lines if line.endswith("step/s") or line.endswith("it/s")]
    return float(words[-1][-2])


def preflight(cfg: DecoderConfig, work: Path, movq: Path) -> None:
    """Run the decoder's device paths on a few scenes (pool encoding, decoding, judging) before the long stages."""
    from diffusers import VQModel

    from eclipse_prior.shapes.decoder import latent_pool, load_vision_model, oracle_check

    tiny = replace(cfg, pool_size=64)
    latent_pool(tiny, work, load_vision_model(SHIPPED / "clip"), VQModel.from_pretrained(movq), lambda m: None)
    oracle_check(n_per_category=1, num_inference_steps=2, device=cfg.device)


def seed_movq(work: Path, movq: Path) -> None:
    """The decoder build's movq stages, done: its encoder is the standardised one, its decoder the tuned one."""
    for name in ("movq-final", "movq-tuned"):
        if not (work / name).exists():
            shutil.copytree(movq, work / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--clip-budget-s", type=float, default=120)
    ap.add_argument("--unet-budget-s", type=float, default=180)
    ap.add_argument("--deadline-s", type=float, default=520, help="finish by then: the UNet budget shrinks to fit")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--movq", default=str(SHIPPED / "decoder" / "movq"))
    ap.add_argument("--smoke", action="store_true", help="tiny pools and budgets (checks the script end to end)")
    args = ap.parse_args()
    start = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"device": args.device}
    if args.device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name()
    torch.set_num_threads(8)

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    pool = 2000 if args.smoke else None
    clip_cfg = replace(CLIP, device=args.device, render_workers=args.workers, pool_size=pool or CLIP.pool_size)
    dec_cfg = replace(DECODER, device=args.device, render_workers=args.workers, pool_size=pool or DECODER.pool_size)
    if args.smoke:
        clip_cfg = replace(clip_cfg, batch_size=64, loader_workers=2)
        dec_cfg = replace(dec_cfg, unet_batch_size=64)

    preflight(dec_cfg, work / "preflight", Path(args.movq))
    log("preflight passed")
    # calibration: resumable runs stopped after a warm-up and again later
    cal = work / "calibrate"
    clip_rate = rate(lambda n, log_to: train_clip(replace(clip_cfg, steps=10**6, pool_size=2000), cal / "clip",
                                                  log_to, n), 5, 205)
    latents, embeds = torch.randn(1024, DECODER.latent_channels, 16, 16), torch.randn(1024, 64)
    unet_rate = rate(lambda n, log_to: train_unet(replace(dec_cfg, unet_steps=10**6), cal / "unet", latents,
                                                  embeds, embeds[:1], log_to, stop_at=n), 5, 105)
    record["calibrated_step_per_s"] = {"clip": round(clip_rate, 2), "unet": round(unet_rate, 2)}
    log(f"calibrated: clip {clip_rate:.1f} step/s at batch {clip_cfg.batch_size}, "
        f"unet {unet_rate:.1f} step/s at batch {dec_cfg.unet_batch_size}")

    # CLIP
    clip_cfg = replace(clip_cfg, steps=max(50, int(0.9 * args.clip_budget_s * clip_rate)))
    t0 = time.time()
    metrics = build_clip(out / "clip-new", work / "clip", clip_cfg, log=lambda m: None)
    record["clip"] = {"config": asdict(clip_cfg), "seconds": round(time.time() - t0, 1), "metrics": metrics}
    log(f"clip: {clip_cfg.steps} steps in {time.time() - t0:.0f}s; zero-shot mean "
        f"{metrics['zero_shot_top1/mean']:.3f}, matching cos {metrics['gap_matching_cos']:.3f}")

    # read-out gate: the same probe on the same scenes for the shipped and the new CLIP
    n_train = 2000 if args.smoke else 27_000
    probes = {
        name: probe_clip(path, n_train=(n_train,), hidden=(0,), workers=args.workers, device=args.device)
        ["probes"][0]["accuracy"]
        for name, path in (("shipped", SHIPPED / "clip"), ("new", out / "clip-new"))
    }
    record["readout_linear"] = probes
    shape = {k: v["shape"]["two_object"] for k, v in probes.items()}
    colour = {k: v["colour"]["two_object"] for k, v in probes.items()}
    keep_new = shape["new"] > shape["shipped"] and colour["new"] >= colour["shipped"] - 0.03
    record["clip_kept"] = "new" if keep_new else "shipped"
    log(f"read-out two-object shape/colour: shipped {shape['shipped']:.3f}/{colour['shipped']:.3f}, "
        f"new {shape['new']:.3f}/{colour['new']:.3f} -> decoder on the {record['clip_kept']} CLIP")
    clip_dir = out / "clip"
    shutil.copytree(out / "clip-new" if keep_new else SHIPPED / "clip", clip_dir)
    (out / "gpu_build.json").write_text(json.dumps(record, indent=2) + "\n")

    # decoder: UNet budget shrinks so that qualification still fits before the deadline
    left = args.deadline_s - (time.time() - start) - 30 - 0.0003 * dec_cfg.pool_size - 60
    budget = max(10.0, min(args.unet_budget_s, left))
    dec_cfg = decoder_schedule(dec_cfg, max(50, int(0.9 * budget * unet_rate)))
    seed_movq(work / "decoder", Path(args.movq))
    t0 = time.time()
    build_decoder(out / "decoder", clip_path=clip_dir, work_dir=work / "decoder", config=dec_cfg,
                  log=lambda m: None, qualify_per_category=2 if args.smoke else 16)
    build = json.loads((out / "decoder" / "build.json").read_text())
    record["decoder"] = {"budget_s": round(budget, 1), "seconds": round(time.time() - t0, 1),
                         "stage_seconds": build["stage_seconds"], "oracle_check": build["oracle_check"]["oracle"],
                         "guidance": build["decoder_guidance_sweep"]["chosen"]}
    log(f"decoder: {dec_cfg.unet_steps} UNet steps; oracle {build['oracle_check']['oracle']}")
    record["total_seconds"] = round(time.time() - start, 1)
    (out / "gpu_build.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The accelerator suite: `python benchmarks/run.py --device cuda [--budget-s S] [--only a,b]`.

One command, sized (by estimate: not yet run on a GPU) to finish in about 5 minutes on one H100/H200, so it can
be rerun inside a 15-minute lease; it writes `benchmarks/results/<gpu name>.{md,json}` after every section (a run cut short keeps what it measured).
Sections, in priority order (each a ratio against a baseline from the same run):

- `train`: released network (kandinsky22, 80 tokens) at batch 256 and 1024, bf16: samples/s and MFU against
  dense bf16 matmul measured in the same run; plain PyTorch loop vs the trainer's step, eager vs torch.compile;
  SDPA backend and EMA diagnostics; the paper's recipe in hours (device_train.py);
- `latency`: ECLIPSE vs Diffusion-Baseline vs the 1B Kandinsky prior, batch 1 and 16, fp16 and bf16;
- `e2e`: 512x512 images with the real-size Kandinsky 2.2 decoder, ECLIPSE vs the 1B prior, with and without
  `--offload model`, latency and peak memory (device_generation.py);
- `embed`: `embed` with CLIP ViT-bigG-14 (random weights, fp16) from JPEG webdataset shards vs its forward alone;
- `store`: `train` from a store vs batches already on the device (device_store.py).

`--budget-s` skips the sections that would start after that many seconds (default 300); `--smoke` (with
`--device cpu`) runs every section at tiny sizes in well under a minute, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import common
import device_generation
import device_store
import device_train
import embed_real

SECTIONS = ("train", "latency", "e2e", "embed", "store")
TITLES = {
    "train": "1. Training the released network: samples/s and MFU (vs bf16 matmul), plain loop vs trainer vs compile",
    "latency": "2. Prior latency: ECLIPSE vs Diffusion-Baseline vs the 1B Kandinsky prior",
    "e2e": "3. End-to-end 512x512 with the real-size Kandinsky 2.2 decoder (50 steps), with and without offload",
    "embed": "4. `embed` with CLIP ViT-bigG-14 from JPEG webdataset shards vs the encoder forward alone",
    "store": "5. `train` from a store vs batches already on the device",
}
FORMATTERS: dict[str, Callable[[Any], list[str]]] = {
    "train": device_train.format_section,
    "latency": device_generation.format_latency,
    "e2e": device_generation.format_end_to_end,
    "embed": embed_real.format_row,
    "store": device_store.format_row,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """run.py's flags for this suite."""
    parser.add_argument("--device", default=None, help="run the accelerator suite on this device (cuda, cuda:1, cpu)")
    parser.add_argument("--smoke", action="store_true", help="with --device: tiny sizes (checks the script on a CPU)")
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="with --device: start no section after this many seconds"
    )


def sections(device: torch.device, smoke: bool) -> dict[str, Callable[[], Any]]:
    """The suite's sections as callables, sized for `device` (smoke: tiny)."""
    # embed: 4096 rows (~10 s of ViT-bigG forward on an H100) so the DataLoader workers' start-up (~1 s) is
    # amortised as in a real run; 16 shards of 2 full batches each, since batches never straddle shards
    workers = 2 if smoke else min(12, max(2, (os.cpu_count() or 4) - 2))
    return {
        "train": lambda: device_train.run(device, smoke, compile_backend="eager" if smoke else "inductor"),
        "latency": lambda: device_generation.prior_latency(device, smoke),
        "e2e": lambda: device_generation.end_to_end(device, smoke),
        "embed": lambda: embed_real.run(
            "tiny" if smoke else "vit-bigg-14", device, rows=32 if smoke else 4096, batch=8 if smoke else 128,
            workers=workers, shards=4 if smoke else 16,
            dtype=torch.float16 if device.type == "cuda" else torch.float32,
        ),
        "store": lambda: device_store.run(device, smoke),
    }


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The results document."""
    out = [
        f"# Accelerator benchmarks: {meta['name']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- device: {meta['device_name']} ({meta['device']}); host CPU {meta['cpu']}, {meta['cores']} cores; "
        f"torch {meta['torch']}",
        f"- budget {meta['budget_s']:.0f} s; section seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in meta["section_seconds"].items()),
        "",
    ]
    for key in SECTIONS:
        out += [f"## {TITLES[key]}", ""]
        r = results.get(key)
        if r is None:
            out.append("not run")
        elif isinstance(r, dict) and "error" in r:
            out.append(f"FAILED: {r['error']}")
        elif isinstance(r, dict) and "skipped" in r:
            out.append(f"skipped: {r['skipped']}")
        else:
            out += FORMATTERS[key](r)
        out.append("")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    """Run the sections in order within the budget, writing the results after each; returns the exit status."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.smoke:
        print("the accelerator suite at full size needs a GPU; on a CPU pass --smoke", file=sys.stderr)
        return 2
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    name = args.machine or (
        "smoke-" + device.type if args.smoke else torch.cuda.get_device_name(device).replace(" ", "-")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    calls = sections(device, args.smoke)
    meta: dict[str, Any] = {
        "name": name,
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)",
        "cpu": common.cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "budget_s": args.budget_s,
        "section_seconds": {},
    }
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for key in wanted:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results[key] = {"skipped": f"budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s)"}
            continue
        print(f"[device bench] {key} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results[key] = calls[key]()
        except Exception as err:  # one broken section must not hide the others' numbers
            results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        meta["section_seconds"][key] = time.perf_counter() - t0
        print(f"[device bench] {key} done in {meta['section_seconds'][key]:.0f} s", file=sys.stderr, flush=True)
        _write(out, name, results, meta)
    md = _write(out, name, results, meta)
    print(md)
    return 1 if any(isinstance(r, dict) and "error" in r for r in results.values()) else 0


def _write(out: Path, name: str, results: dict[str, Any], meta: dict[str, Any]) -> str:
    from eclipse_prior.outputs import write_json_atomic, write_text_atomic

    md = render(results, meta)
    write_json_atomic(out / f"{name}.json", json.loads(json.dumps({"meta": meta, "results": results}, default=str)))
    write_text_atomic(out / f"{name}.md", md + "\n")
    return md

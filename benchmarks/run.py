"""`make bench`: run every benchmark, print one table, write benchmarks/results/<machine>.json and .md.

Sections (each a ratio against a baseline measured in the same run):
1. training throughput and MFU, fp32 and bf16, against a plain fp32 loop and dense matmul (train_throughput.py);
2. training cost of store + training against re-encoding with CLIP every step (train_vs_reencode.py);
3. prior latency, ECLIPSE vs Diffusion-Baseline vs Kandinsky's 1B prior (prior_latency.py, pipelines helper);
4. `embed` throughput against the encoder's forward pass alone (embed_throughput.py);
5. peak memory of training the released network at batch 256 against its model+optimizer state (memory.py);
6. data path: rows/s of the store and the training loader against the machine's sequential read() ceiling,
   warm and cold, with text states and pooled-only (data_path.py);
7. `train --compile` on this CPU, eager vs torch.compile (device_train.py);
8. `embed` with a real-size CLIP ViT-L/14 from JPEG webdataset shards vs its forward pass alone (embed_real.py).
Sections 7 and 8 take long on a CPU (compilation; a 428M-parameter CLIP) and run only when named in `--only`.

Threads: `--threads auto` (default) uses every core unless the 1-minute load average already exceeds the core
count, then one thread: on an oversubscribed machine two OpenMP threads spin waiting for each other whenever one
is descheduled, which measured 5-10x slower per CPU-second here than one thread. The choice and the load
averages are written into the results. A failing section is reported in the table and does not stop the rest.

Usage: `python benchmarks/run.py [--quick] [--threads auto|N] [--machine NAME]`. With `--device cuda` it runs the
accelerator suite instead (device_suite.py: training MFU, prior and end-to-end latency, real-size `embed`, store
loader), writing results/<gpu name>.{md,json}; `--device cpu --smoke` runs that suite at tiny sizes on a CPU.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import data_path  # noqa: E402
import device_suite  # noqa: E402
import device_train  # noqa: E402
import embed_real  # noqa: E402
import embed_throughput  # noqa: E402
import memory  # noqa: E402
import train_throughput  # noqa: E402
import train_vs_reencode  # noqa: E402


def _section(name: str, fn: Callable[[], Any], results: dict[str, Any], timings: dict[str, float]) -> None:
    start = time.perf_counter()
    print(f"[bench] {name} ... (load {common.load_average():.1f})", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as err:  # one broken section must not hide the others' numbers
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    timings[name] = time.perf_counter() - start
    print(f"[bench] {name} done in {timings[name]:.0f} s", file=sys.stderr, flush=True)


def _latency(quick: bool, threads: int) -> list[dict[str, Any]]:
    import prior_latency

    return prior_latency.run(quick, threads=threads)


def _latency_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| prior | params | latency per prompt (s) | latency vs ECLIPSE | forward FLOPs | FLOPs vs ECLIPSE | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prior']} | {r['params'] / 1e6:.0f}M | {r['latency_s']:.3f} | {r['latency_ratio']:.1f}x "
            f"| {r['flops'] / 1e9:.1f} G | {r['flop_ratio']:.1f}x | {r.get('measured', '')} |"
        )
    return lines


def _curve_lines(c: dict[str, Any]) -> list[str]:
    return [
        f"Loss curves ({c['preset']} network, batch {c['batch']}, {c['steps']} steps, same weights/noise/batches, "
        f"moving average over {c['smoothing_window']} steps): max relative gap bf16 autocast + fast vs fp32 = "
        f"{c['max_rel_gap_bf16_vs_fp32']:.2%}; two fp32 runs differing only in noise seed = "
        f"{c['max_rel_gap_fp32_noise_seed']:.2%} -> bf16 {'within' if c['bf16_within_noise'] else 'OUTSIDE'} "
        f"run-to-run noise.",
    ]


def render_markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """One document: header (command, date, machine, load, threads) and a table per section."""
    m = meta["machine"]
    out = [
        f"# Benchmarks: {meta['name']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['cpu_capability']}), "
        f"GPU: {m['gpu'] or 'none (no GPU column: none was available)'}",
        f"- threads: {meta['threads']} ({meta['threads_reason']}); 1-min load average at start/end: "
        f"{meta['load_start']:.1f} / {meta['load_end']:.1f} (other users' jobs on the same cores)",
        f"- wall time: {sum(meta['section_seconds'].values()):.0f} s for sections {', '.join(meta['section_seconds'])}",
    ]
    for e in meta.get("earlier_runs", []):
        out.append(
            f"- sections {', '.join(e['kept'])} kept from `{e['command']}` of {e['date']} (threads {e['threads']}, "
            f"load {e['load_start']:.1f} / {e['load_end']:.1f}, {sum(e['section_seconds'].values()):.0f} s)"
        )
    out.append("")

    def section(title: str, key: str, lines: Callable[[Any], list[str]]) -> None:
        out.extend([f"## {title}", ""])
        r = results.get(key)
        if r is None:
            out.append("not run")
        elif isinstance(r, dict) and "error" in r:
            out.append(f"FAILED: {r['error']}")
        else:
            out.extend(lines(r))
        out.append("")

    section(
        "1. Training throughput and MFU (vs plain fp32 loop and dense matmul of the same dtype)",
        "train",
        lambda r: train_throughput.format_rows(r["rows"])
        + ["", _matmul_line(r["rows"]), ""]
        + _curve_lines(r["loss_curves"]),
    )
    section("2. Training cost: store + training vs re-encoding every step", "reencode", train_vs_reencode.format_row)
    section("3. Prior latency (generation)", "latency", _latency_lines)
    section("4. `embed` throughput vs the encoder forward pass alone", "embed", embed_throughput.format_row)
    section("5. Peak memory of training the released network", "memory", memory.format_rows)
    section("6. Data path: store and loader rows/s vs sequential read() (batch 1024)", "data", data_path.format_rows)
    section("7. `train --compile` on this CPU: eager vs torch.compile", "compile", device_train.format_cpu_compile)
    section("8. `embed` with a real-size CLIP ViT-L/14 from JPEG webdataset shards", "embed-vitl", embed_real.format_row)
    return "\n".join(out)


def _matmul_line(rows: list[dict[str, Any]]) -> str:
    by_dtype: dict[str, float] = {}
    for r in rows:
        key = "bf16" if r["recipe"].startswith("bf16") else "fp32"
        by_dtype.setdefault(key, r["matmul_gflops_cpu"])
    parts = ", ".join(f"{k} {v:.0f} GFLOP/s per CPU-second" for k, v in by_dtype.items())
    return (
        f"Dense {common.MATMUL_SIZE}x{common.MATMUL_SIZE} torch.matmul in the same run: {parts}. MFU = training FLOPs "
        "(6 x matmul-parameter-tokens + 12 x layers x tokens^2 x width per sample) / those rates."
    )


def _earlier_runs(old: dict[str, Any], kept: set[str]) -> list[dict[str, Any]]:
    """Which earlier run made each kept section: the previous file's own run and the runs it had kept in turn."""
    keep = ("command", "date", "threads", "threads_reason", "load_start", "load_end", "section_seconds")
    own = {k: old[k] for k in keep} | {"kept": list(old["section_seconds"])}
    before = old.get("earlier_runs") or ([old["earlier_run"]] if old.get("earlier_run") else [])
    runs = []
    for run in (own, *before):
        sections = sorted(set(run["kept"]) & kept)
        if sections:
            runs.append(run | {"kept": sections})
    return runs


def main() -> int:
    """Run the suite and write the results; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small repeats and sizes (< 3 minutes on 2 idle cores)")
    parser.add_argument("--threads", default="auto", help="torch intra-op threads: auto (default) or a number")
    parser.add_argument("--machine", default=None, help="results file name (default cpu-<cores>core or the GPU)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections (train,reencode,latency,embed,memory,data; compile,embed-vitl only when "
        f"named; with --device: {','.join(device_suite.SECTIONS)}); the other sections' results are kept from an "
        "existing <machine>.json, and the header names what was rerun and when",
    )
    device_suite.add_arguments(parser)
    args = parser.parse_args()
    if args.device is not None:  # the accelerator suite (benchmarks/device_suite.py)
        return device_suite.main(args)

    cores = os.cpu_count() or 1
    load_start = common.load_average()
    if args.threads == "auto":
        threads = 1 if load_start > cores else cores
        reason = "auto: load average above core count" if threads == 1 else "auto: all cores"
    else:
        threads, reason = int(args.threads), "--threads"
    torch.set_num_threads(threads)
    info = common.machine_info()
    name = args.machine or ("gpu-" + info["gpu"].replace(" ", "-") if info["gpu"] else f"cpu-{cores}core")
    if args.quick:
        name += "-quick"

    sections: dict[str, Callable[[], Any]] = {
        "train": lambda: train_throughput.run(args.quick),
        "reencode": lambda: train_vs_reencode.run(args.quick),
        "latency": lambda: _latency(args.quick, threads),
        "embed": lambda: embed_throughput.run(args.quick),
        "memory": lambda: memory.run(args.quick, threads),
        "data": lambda: data_path.run(args.quick),
        "compile": lambda: device_train.cpu_compile(args.quick),
        "embed-vitl": lambda: embed_real.run(
            "vit-l-14", torch.device("cpu"), rows=8 if args.quick else 16, batch=4 if args.quick else 8, workers=2,
            shards=2,
        ),
    }
    # compile (minutes of compilation per network) and embed-vitl (a 428M-parameter CLIP on a CPU) run when named
    wanted = args.only.split(",") if args.only else [k for k in sections if k not in ("compile", "embed-vitl")]
    out = Path(args.out)
    previous = out / f"{name}.json"
    fresh: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for key in wanted:
        _section(key, sections[key], fresh, seconds)
    results: dict[str, Any] = {}
    earlier: list[dict[str, Any]] = []
    if previous.is_file():  # read now, not at start: another --only run may have finished meanwhile
        old = json.loads(previous.read_text())
        results = {k: v for k, v in old["results"].items() if k not in wanted}
        earlier = _earlier_runs(old["meta"], set(results))
    results |= fresh

    meta = {
        "name": name,
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "threads": threads,
        "threads_reason": reason,
        "load_start": load_start,
        "load_end": common.load_average(),
        "section_seconds": seconds,
        "earlier_runs": earlier,
    }
    md = render_markdown(results, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    return 1 if any(isinstance(r, dict) and "error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

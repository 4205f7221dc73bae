"""Peak memory of training the released configuration (kandinsky22 preset) at batch 256, fp32 and bf16 autocast.

Each measurement runs in its own subprocess, so one peak cannot hide another (ru_maxrss only ever grows). The
child builds the network and AdamW, allocates AdamW's state with a zero-gradient step (lr 0: weights do not
change), records its resident set size, then runs one full training step (forward, eclipse loss, backward, AdamW)
and reports the peak RSS. The baseline is the model + optimizer state (fp32 weights, gradients, and AdamW's two
moments: 16 bytes per trainable parameter); the table gives the peak as a multiple of it and the activation
memory (peak minus the RSS before the step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(preset: str, batch: int, bf16: bool, threads: int) -> dict[str, Any]:
    import torch

    from eclipse_prior.models import EclipsePrior
    from train_throughput import RECIPES, make_step, synthetic_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = EclipsePrior.from_preset(preset)
    recipe = RECIPES[2] if bf16 else RECIPES[0]
    data = synthetic_batch(model.config, batch, seed=1)
    data["noise"] = torch.randn(data["text_embeds"].shape)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, optimizer = make_step(model, recipe, iter([data]), lr=1e-4)
    # allocate AdamW's moments without a forward pass: a zero-gradient step at lr 0
    for p in trainable:
        p.grad = torch.zeros_like(p)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    optimizer.param_groups[0]["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    before = _rss_bytes()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(p.numel() for p in trainable)
    return {
        "preset": preset,
        "batch": batch,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "trainable_params": n,
        "state_bytes": 16 * n,
        "rss_before_step": before,
        "peak_rss": peak,
    }


def measure(preset: str, batch: int, bf16: bool, threads: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON row."""
    cmd = [sys.executable, str(HERE / "memory.py"), "--child", preset, str(batch), "1" if bf16 else "0", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr.strip().splitlines()[-1:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["peak_over_state"] = row["peak_rss"] / row["state_bytes"]
    row["activations_bytes"] = row["peak_rss"] - row["rss_before_step"]
    return row


def run(quick: bool = False, threads: int = 1) -> list[dict[str, Any]]:
    """fp32 and bf16 peaks at batch 256 (quick: batch 64, fp32 only)."""
    if quick:
        return [measure("kandinsky22", 64, False, threads)]
    return [measure("kandinsky22", 256, bf16, threads) for bf16 in (False, True)]


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for the memory table."""
    gib = 2**30
    lines = [
        "| network | precision | batch | model+AdamW state (baseline) | peak RSS | peak / state | activations etc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} ({r['trainable_params'] / 1e6:.1f}M) | {r['precision']} | {r['batch']} "
            f"| {r['state_bytes'] / gib:.2f} GiB | {r['peak_rss'] / gib:.2f} GiB | {r['peak_over_state']:.1f}x "
            f"| {r['activations_bytes'] / gib:.2f} GiB |"
        )
    return lines


def main() -> None:
    """`python benchmarks/memory.py [--quick]`, or `--child PRESET BATCH BF16 THREADS` (one measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("PRESET", "BATCH", "BF16", "THREADS"))
    args = parser.parse_args()
    if args.child:
        preset, batch, bf16, threads = args.child
        print(json.dumps(_child(preset, int(batch), bf16 == "1", int(threads))))
        return
    print("\n".join(format_rows(run(args.quick, args.threads))))


if __name__ == "__main__":
    main()

"""Timing on an accelerator (or on the CPU for smoke runs): synchronised wall time, dense matmul ceilings.

On a GPU, kernels run asynchronously: a timed region ends with `torch.cuda.synchronize()`, otherwise it measures
how fast Python queues work. Repeats are interleaved round-robin (A B C A B C ...) like the CPU suite's, and the
median is reported. The matmul ceiling is measured in the same run, on the same device, in the same dtype.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for queued kernels (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one synchronised call."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Per callable, the wall seconds of `repeats` synchronised calls taken round-robin after `warmup` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            timed(fn, device)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(timed(fn, device))
    return out


def median(xs: list[float]) -> float:
    """Median of a list of seconds."""
    return statistics.median(xs)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5, inner: int = 10) -> dict[str, Any]:
    """Dense n x n @ n x n FLOP/s in `dtype` on `device` (inner calls per timed repeat, median over repeats).

    8192 reaches the tensor-core plateau of an H100/H200 (the same size as the usual matmul benchmarks); smoke
    runs use a small n on the CPU.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)

    def call() -> None:
        for _ in range(inner):
            torch.matmul(a, b)

    secs = interleaved_medians({"mm": call}, device, repeats)["mm"]
    flops = 2 * n**3 * inner
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": flops / median(secs), "seconds": secs}


def peak_memory_reset(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset; None on a CPU (see memory.py for RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def device_name(device: torch.device) -> str:
    """The accelerator's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

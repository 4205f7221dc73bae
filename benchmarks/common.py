"""Timing helpers shared by the benchmark suite: warm-up, median of repeats, and the matmul baseline.

Why ratios, and why CPU time as well as wall time. The machine these numbers are made on is shared (two cores,
often a load average above 10), so a wall-clock figure mostly measures the neighbours. Every measurement here
records both the wall time and the CPU time this process consumed (`time.process_time`, all threads); the
figures the suite reports are ratios of two measurements taken interleaved in the same run (a training step
against dense matmul of the same dtype, one pipeline against another), so a slow minute slows both sides.
CPU-time ratios are the steadier of the two under contention (a descheduled process does not accrue CPU time);
on an idle machine both agree. With one intra-op thread no OpenMP thread ever spins waiting for a descheduled
sibling, which is why `--threads 1` is the steadiest choice on an oversubscribed box.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Per-repeat wall and CPU seconds of one measured callable (warm-up excluded)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """Median wall seconds: robust to the occasional descheduled repeat."""
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        """Median CPU seconds consumed by this process (all threads)."""
        return statistics.median(self.cpu)

    def add(self, wall: float, cpu: float) -> None:
        """Record one repeat."""
        self.wall.append(wall)
        self.cpu.append(cpu)


def timed_call(fn: Callable[[], Any], timing: Timing) -> Any:
    """Run `fn` once and append its wall and CPU seconds to `timing`; returns fn's result."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    timing.add(time.perf_counter() - w0, time.process_time() - c0)
    return out


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Warm up (allocation, kernel selection), then time `repeats` calls."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        timed_call(fn, timing)
    return timing


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several callables round-robin (A B C A B C ...) so that a burst of load hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timed_call(fn, timings[name])
    return timings


MATMUL_SIZE = 2048


def matmul_call(dtype: torch.dtype, n: int = MATMUL_SIZE) -> tuple[Callable[[], Any], int]:
    """A dense n x n @ n x n product in `dtype` and its FLOP count (2 n^3): the machine's ceiling.

    2048 is large enough to reach the GEMM plateau on this CPU (1024 is ~5% lower, 4096 no higher) and small
    enough (0.2 s fp32 on two cores) to be measured between every training repeat.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    return (lambda: torch.matmul(a, b)), 2 * n**3


def flops_per_s(flops: float, timing: Timing) -> dict[str, float]:
    """FLOP/s by wall time and by CPU time."""
    return {"wall": flops / timing.wall_s, "cpu": flops / timing.cpu_s}


def load_average() -> float:
    """1-minute load average (how many runnable processes competed for the cores)."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    """`lscpu` model name (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, torch build, ISA level and GPU (if any)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fmt_rate(x: float) -> str:
    """Three significant figures without scientific notation for the table."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"

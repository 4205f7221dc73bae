"""How much memory is free where work will run, so sizes that cannot fit are refused in one line up front
instead of ending in an out-of-memory kill (which leaves no message at all)."""

from __future__ import annotations

from pathlib import Path


def available_memory(device: str = "cpu") -> int | None:
    """Free bytes on `device`: the GPU's free memory for cuda, else the machine's MemAvailable (None: unknown)."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"

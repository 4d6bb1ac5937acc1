"""What a training loop cost: wall-clock time, throughput and each process's peak memory during it, and
the peak before it (loading the model and data, building the engine).

Peak memory is counted from the start of the loop, so it shows model states, gradients, optimizer
states and activations rather than a transient of loading the checkpoint (which the setup peak shows):
on a GPU the peak of allocated memory, on Linux CPUs the peak resident set (reset through
/proc/self/clear_refs), elsewhere the process's lifetime peak resident set.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Freed heap memory first goes back to the OS (glibc keeps it otherwise, e.g. the full weights a
    # ZeRO-3 process loaded before partitioning), so that the peak counts memory in use during the loop.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # "5" resets the peak resident set size (Linux 4.0+); elsewhere the lifetime peak is reported.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resident_memory_bytes() -> tuple[int, int]:
    """(current, peak since the last reset_peak_memory) resident set of this process on Linux; (0, 0)
    where /proc is not there."""
    try:
        status = _STATUS.read_text()
    except OSError:
        return 0, 0
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))


class LoopUsage:
    """Start it right before the training loop; `summary` at its end. Every rank must do both."""

    def __init__(self, ranks: Any):
        self.ranks = ranks
        self.setup_peak = peak_memory_bytes(ranks.device)  # loading the model and data, building the engine
        reset_peak_memory(ranks.device)
        self.started = time.perf_counter()

    def summary(self, trained: int, unit: str = "tokens") -> dict[str, Any]:
        """Loop runtime, trained units (target tokens, or samples) per second over all ranks, and every
        process's peak memory in MiB (rank order); in a resumed run, of the part since the resume."""
        runtime = time.perf_counter() - self.started
        per_process = self.ranks.gather(peak_memory_bytes(self.ranks.device))
        setup = self.ranks.gather(self.setup_peak)
        return {
            "train_runtime": round(runtime, 6),
            f"train_{unit}_per_second": round(trained / runtime, 3),
            "peak_memory_mib_per_process": [round(b / 2**20, 1) for b in per_process],
            "setup_peak_memory_mib_per_process": [round(b / 2**20, 1) for b in setup],
        }

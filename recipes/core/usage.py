"""What a training loop cost: wall-clock time, throughput and each process's peak memory."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated device memory on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def loop_usage(accelerator: Any, started: float, target_tokens: int) -> dict[str, Any]:
    """Runtime of the training loop since `started` (time.perf_counter), target tokens per second over
    all ranks, and the peak memory of every process in MiB (rank order). Every rank must call it."""
    runtime = time.perf_counter() - started
    peak = torch.tensor([peak_memory_bytes(accelerator.device)], device=accelerator.device)
    per_process = accelerator.gather(peak).tolist()
    return {
        "train_runtime": round(runtime, 3),
        "train_tokens_per_second": round(target_tokens / runtime, 2),
        "peak_memory_mib_per_process": [round(b / 2**20, 1) for b in per_process],
    }

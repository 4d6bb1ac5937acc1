"""Wall clock of a run from its FLOPs: FLOPs / (devices x dense peak FLOP/s x utilisation)."""

from __future__ import annotations

DEFAULT_UTILIZATION = 0.4  # model FLOPs utilisation of a well-tuned dense training job on GPUs


def wall_clock_seconds(flops: float, num_devices: int, peak_flops: float, utilization: float) -> float:
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    return flops / (num_devices * peak_flops * utilization)


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

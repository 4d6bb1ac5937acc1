"""What a training step processes: its micro-batches, and what one sample costs beyond one sequence.

Preference tuning: each pair trains two sequences (chosen and rejected), so tokens and the micro-batch's
sequences double; a reference model's forward (a third of forward + backward) runs over the same tokens
every step, or once over the training pairs when precomputed; a frozen copy as the reference holds its
parameters on every device (partitioned under ZeRO-3) next to the policy's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatch:
    """`size` samples of `seq_len` tokens (a mean, or max_seq_length as an upper bound); `accumulating`:
    more than one micro-batch per optimizer step on each process (gradient accumulation)."""

    size: int
    seq_len: float
    accumulating: bool = False


@dataclass(frozen=True)
class Workload:
    """What a training sample costs beyond one sequence trained on (see the module docstring)."""

    sequences_per_sample: int = 1
    reference: str | None = None  # None | "copy" | "adapter" (forward every step) | "precomputed" (once)

"""The processes of a run, as the training loop, the checkpoints and the non-finite check need them.

Sums run over the data-parallel ranks (the ones that see different data: every process under Accelerate,
one process per pipeline under the pipeline recipe); agreements (`any`) and barriers over all processes.
With a single process every collective is the identity, with or without a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    def __init__(
        self,
        *,
        num_processes: int,
        process_index: int,
        device: torch.device,
        end: Callable[[], None],
        data_parallel_group: Any = None,
    ):
        """`end` releases the processes' resources before an early exit (the process group)."""
        self.num_processes, self.process_index, self.device = num_processes, process_index, device
        self.is_main_process = process_index == 0
        self.data_parallel_group = data_parallel_group
        self._end = end

    @classmethod
    def of_accelerator(cls, accelerator: Any) -> Ranks:
        return cls(
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            device=accelerator.device,
            end=accelerator.end_training,
        )

    def over_data_parallel_group(self, group: Any) -> Ranks:
        """The same processes, summing over `group` (e.g. one rank per pipeline)."""
        return Ranks(
            num_processes=self.num_processes,
            process_index=self.process_index,
            device=self.device,
            end=self._end,
            data_parallel_group=group,
        )

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 and dist.is_initialized()

    def sum(self, value: torch.Tensor | int) -> Any:
        """`value` summed over the data-parallel ranks, in its own dtype (counts stay integers): a number,
        or a list of numbers for a vector (one collective for all of them)."""
        total = _tensor(value, self.device)
        if self.distributed:
            dist.all_reduce(total, group=self.data_parallel_group)
        return total.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is True on at least one of them."""
        flags = torch.tensor(float(flag), device=self.device)
        if self.distributed:
            dist.all_reduce(flags)
        return flags.item() > 0

    def gather(self, value: int | float) -> list[int | float]:
        """`value` of every process, in rank order."""
        mine = _tensor(value, self.device)
        if not self.distributed:
            return [mine.item()]
        values = [torch.zeros_like(mine) for _ in range(self.num_processes)]
        dist.all_gather(values, mine)
        return [v.item() for v in values]

    def concatenate(self, items: list) -> list:
        """The lists `items` of every process (picklable values), joined in rank order; the same on every
        process."""
        if not self.distributed:
            return list(items)
        every: list = [None] * self.num_processes
        dist.all_gather_object(every, items)
        return [item for part in every for item in part]

    def wait_for_everyone(self) -> None:
        if self.distributed:
            dist.barrier()

    def end(self) -> None:
        self._end()


def _tensor(value: torch.Tensor | int | float, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).clone()
    return torch.tensor(
        value, dtype=torch.float64 if isinstance(value, float) else torch.int64, device=device
    )

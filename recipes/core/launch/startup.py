"""How a launched recipe process starts, before it loads anything: its process group, the doctor's checks
of its configs against the launch, and its Accelerator with the DeepSpeed config settled (the
trackers start with the run's records: core/output/tracking.py)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator

from recipes.core.distributed.accelerator import init_distributed, make_accelerator, settle_deepspeed_config
from recipes.core.distributed.fsdp import check_applies
from recipes.core.doctor.diagnose import preflight
from recipes.core.plan.steps import resolve_gradient_accumulation


def setup_accelerator(cfg: Any) -> tuple[Accelerator, int]:
    """The Accelerator of a recipe run and its resolved gradient accumulation.

    The process group comes first (the world size decides accumulation under global_batch_size), then the
    doctor's checks of the recipe against the launcher's DeepSpeed config, before anything is loaded.
    """
    state = init_distributed()
    preflight(cfg, state.num_processes)
    check_applies(state.num_processes, state.device.type)  # FSDP on one CPU process would not shard
    ga = resolve_gradient_accumulation(
        cfg.gradient_accumulation_steps,
        cfg.global_batch_size,
        cfg.per_device_train_batch_size,
        state.num_processes,
    )
    accelerator = make_accelerator(ga, cfg.mixed_precision)
    settle_deepspeed_config(accelerator, cfg)  # the recipe's values into Accelerate's DeepSpeed config
    return accelerator, ga

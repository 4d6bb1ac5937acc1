"""Compute setup: one Accelerator for every topology the launcher chooses.

Recipes know nothing about topology. Without a GPU the same multi-GPU launch config runs on CPU
processes (gloo), which is how the test suite exercises the distributed paths.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

from recipes.core.config import ConfigError
from recipes.core.distributed.deepspeed_config import apply_recipe_values
from recipes.core.distributed.fsdp import check_applies
from recipes.core.doctor import preflight
from recipes.core.output.tracking import tracker_kwargs
from recipes.core.plan import steps


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def has_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> PartialState:
    """Start the process group before anything asks for the world size."""
    if using_deepspeed() and not has_gpu():
        # DeepSpeed on CPU: without an explicit gloo PartialState Accelerate believes it is alone.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return PartialState(backend="gloo")
    return PartialState(cpu=not has_gpu())


def resolve_gradient_accumulation(
    gradient_accumulation_steps: int, global_batch_size: int | None, micro_batch_size: int, dp_size: int
) -> int:
    """steps.resolve_gradient_accumulation, failing with the ConfigError a recipe stops on."""
    try:
        return steps.resolve_gradient_accumulation(
            gradient_accumulation_steps, global_batch_size, micro_batch_size, dp_size
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def make_accelerator(
    gradient_accumulation_steps: int,
    mixed_precision: str,
    *,
    max_grad_norm: float | None = None,
    micro_batch_size: int | None = None,
    **kwargs,
) -> Accelerator:
    """An Accelerator whose accumulation the recipe drives window by window.

    sync_with_dataloader is off because the recipe reads each accumulation window ahead (to count its
    tokens); the end-of-dataloader flag would otherwise force a sync on every micro-batch of the last
    window. A short last window is padded with empty `accumulate` entries instead (core/train/loop.py).

    The seedable sampler draws each epoch's order from (seed, epoch) alone; the default sampler draws it
    from the global RNG, so the order would change with batch size, process count and anything else
    that consumed random numbers first.

    Under DeepSpeed the recipe's accumulation, clipping (max_grad_norm), micro batch and precision are
    written into the DeepSpeed config, whose "auto" entries Accelerate would otherwise fill on its own.

    Under DDP each gradient is a view into the all-reduce bucket it is reduced in: otherwise DDP keeps its
    buckets next to the gradients, a second copy of every gradient (4 bytes per parameter in fp32). The
    recipes zero gradients in place (set_to_none=False) so that they stay those views: gradients set to
    None come back from the next backward as tensors of their own, and under accumulation (no_sync)
    they stay so until the window's last micro-batch, next to the buckets (counted by memory_census).
    """
    accelerator = Accelerator(
        cpu=not has_gpu() and not using_deepspeed(),
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(
            split_batches=False, even_batches=True, use_seedable_sampler=True
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        **kwargs,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        apply_recipe_values(
            plugin.deepspeed_config,
            config_file=os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "(from the accelerate config)"),
            gradient_accumulation_steps=gradient_accumulation_steps,
            max_grad_norm=max_grad_norm,
            micro_batch_size=micro_batch_size,
            world_size=accelerator.num_processes,
            mixed_precision=mixed_precision,
        )
    return accelerator


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
    accelerator = make_accelerator(
        ga,
        cfg.mixed_precision,
        max_grad_norm=cfg.max_grad_norm,
        micro_batch_size=cfg.per_device_train_batch_size,
        **tracker_kwargs(cfg.report_to, cfg.output_dir),
    )
    return accelerator, ga

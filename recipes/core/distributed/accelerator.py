"""Compute setup: one Accelerator for every topology the launcher chooses.

Recipes know nothing about topology. Without a GPU the same multi-GPU launch config runs on CPU
processes (gloo), which is how the test suite exercises the distributed paths.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

from recipes.core.config import read_mapping
from recipes.core.distributed import deepspeed_contract
from recipes.core.distributed.deepspeed_contract import DeepSpeedRun


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


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str, **kwargs) -> Accelerator:
    """An Accelerator whose accumulation the recipe drives window by window.

    sync_with_dataloader is off because the recipe reads each accumulation window ahead (to count its
    tokens); the end-of-dataloader flag would otherwise force a sync on every micro-batch of the last
    window. A short last window is padded with empty `accumulate` entries instead (core/train/loop.py).

    The seedable sampler draws each epoch's order from (seed, epoch) alone; the default sampler draws it
    from the global RNG, so the order would change with batch size, process count and anything else
    that consumed random numbers first.

    Under DDP each gradient is a view into the all-reduce bucket it is reduced in: otherwise DDP keeps its
    buckets next to the gradients, a second copy of every gradient (4 bytes per parameter in fp32). The
    recipes zero gradients in place (set_to_none=False) so that they stay those views: gradients set to
    None come back from the next backward as tensors of their own, and under accumulation (no_sync)
    they stay so until the window's last micro-batch, next to the buckets (counted by memory_census).
    """
    return Accelerator(
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


def settle_deepspeed_config(accelerator: Accelerator, cfg: Any) -> None:
    """Under DeepSpeed: the config Accelerate built, checked against the recipe config `cfg` and filled
    with its accumulation, clipping (max_grad_norm), micro batch and precision (the DeepSpeed contract),
    whose "auto" entries Accelerate would otherwise fill on its own. Call after the Accelerator exists and
    before `prepare` hands the config to DeepSpeed. Raises DeepSpeedConfigError."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if ds_file == "none":  # set in the accelerate config: Accelerate wrote every key of it
        written, ds_file = plugin.deepspeed_config, "(from the accelerate config)"
    else:  # judged as the file says it: Accelerate gives a file without gradient_accumulation_steps a 1
        written = read_mapping(ds_file)
    run = DeepSpeedRun.of(dataclasses.asdict(cfg), accelerator.num_processes, written)
    deepspeed_contract.check(written, run, ds_file)
    deepspeed_contract.fill(plugin.deepspeed_config, run, written)

"""Compute setup: one Accelerator for every topology the launcher chooses.

Recipes know nothing about topology. Without a GPU the same multi-GPU launch config runs on CPU
processes (gloo), which is how the test suite exercises the distributed paths.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import GradientAccumulationPlugin

from recipes.core.steps import gradient_accumulation_for


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
    if global_batch_size:
        return gradient_accumulation_for(global_batch_size, micro_batch_size, dp_size)
    return gradient_accumulation_steps


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str, **kwargs) -> Accelerator:
    """An Accelerator whose accumulation the recipe drives window by window.

    sync_with_dataloader is off because the recipe reads each accumulation window ahead (to count its
    tokens); the end-of-dataloader flag would otherwise force a sync on every micro-batch of the last
    window. The recipe aligns `accelerator.step` at the start of each window instead.
    """
    return Accelerator(
        cpu=not has_gpu() and not using_deepspeed(),
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=False, even_batches=True),
        **kwargs,
    )

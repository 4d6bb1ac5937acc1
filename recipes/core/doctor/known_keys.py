"""The keys and names the doctor accepts, read from Accelerate's and DeepSpeed's own config classes.

Each list is computed on first use: Accelerate imports torch and DeepSpeed picks its accelerator on
import, so neither is imported until a config needs checking against it. The few lists no library
class holds are written out below, each saying why.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cache
from typing import Any


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# DeepSpeed reads its top-level keys one by one from a plain dict (deepspeed/runtime/config.py), so no
# class lists them; these are the keys of the DeepSpeed versions pyproject.toml allows.
DEEPSPEED_KEYS = _words(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps gradient_clipping
    steps_per_print wall_clock_breakdown memory_breakdown dump_state prescale_gradients
    gradient_predivide_factor communication_data_type seq_parallel_communication_data_type
    sparse_gradients disable_allgather fp16 bf16 amp torch_autocast data_types zero_optimization
    zero_allow_untested_optimizer zero_force_ds_cpu_optimizer optimizer scheduler
    activation_checkpointing flops_profiler tensorboard wandb csv_monitor comet comms_logger aio
    pipeline checkpoint elasticity autotuning compression_training data_efficiency curriculum_learning
    sparse_attention eigenvalue progressive_layer_drop nebula weight_quantization hybrid_engine
    dataloader_drop_last use_data_before_expert_parallelism graph_harvesting use_node_local_storage
    load_universal compile timers tensor_parallel mics_shard_size mics_hierarchical_params_gather
    zenflow
    """
)
# Accelerate refuses these `deepspeed_config:` keys next to a deepspeed_config_file; it keeps the list
# as environment variable names inside a method (DeepSpeedPlugin._deepspeed_config_checks).
DEEPSPEED_FILE_CONFLICTS = _words(
    """
    gradient_accumulation_steps gradient_clipping zero_stage offload_optimizer_device
    offload_param_device offload_param_nvme_path offload_optimizer_nvme_path zero3_save_16bit_model
    """
)
# torch registers its rendezvous backends in a registry that does not list them.
RDZV_BACKENDS = frozenset({"static", "c10d", "etcd", "etcd-v2"})


@cache
def accelerate_keys() -> frozenset[str]:
    """Top-level keys of an accelerate config: ClusterConfig's fields, plus the older spellings fp16
    and dynamo_backend that BaseConfig.process_config still converts."""
    from accelerate.commands.config.config_args import ClusterConfig

    return frozenset(f.name for f in dataclasses.fields(ClusterConfig)) | {"fp16", "dynamo_backend"}


@cache
def accelerate_deepspeed_keys() -> frozenset[str]:
    """Keys under `deepspeed_config:`. `accelerate launch` copies each onto its argument of that name, so
    the valid ones are its "DeepSpeed Arguments" (any other key is silently ignored)."""
    return frozenset(launch_group("DeepSpeed Arguments"))


@cache
def launch_group(title: str) -> dict[str, Any]:
    """`accelerate launch`'s arguments of one group, by name, with their defaults."""
    from accelerate.commands.launch import launch_command_parser

    # argparse keeps its groups only in _action_groups; Accelerate's help formatter keys on the same title.
    groups = {group.title: group for group in launch_command_parser()._action_groups}
    return {action.dest: action.default for action in groups[title]._group_actions}


@cache
def accelerate_fsdp_keys() -> frozenset[str]:
    """Keys under `fsdp_config:`: `accelerate launch` copies each onto its argument of that name (adding the
    `fsdp_` prefix when it is missing), so the valid ones are its "FSDP Arguments", plus
    fsdp_ignored_modules, which it reads without declaring it. Any other key is silently ignored."""
    keys = set(launch_group("FSDP Arguments")) | {"fsdp_ignored_modules"}
    return frozenset(keys | {key.removeprefix("fsdp_") for key in keys})


@cache
def accelerate_parallelism_keys() -> frozenset[str]:
    """Keys under `parallelism_config:` (hybrid sharding: dp_replicate x dp_shard)."""
    return frozenset(launch_group("ParallelismConfig Arguments"))


@cache
def distributed_types() -> frozenset[str]:
    from accelerate.utils import DistributedType

    return frozenset(t.value for t in DistributedType)


@cache
def multinode_launchers() -> frozenset[str]:
    from accelerate.utils.constants import DEEPSPEED_MULTINODE_LAUNCHERS

    return frozenset(DEEPSPEED_MULTINODE_LAUNCHERS)


@cache
def zero_keys() -> frozenset[str]:
    """Keys of `zero_optimization`, deprecated ones included."""
    _prepare_deepspeed_import()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return _pydantic_keys(DeepSpeedZeroConfig)


@cache
def offload_keys() -> dict[str, frozenset[str]]:
    """Keys of the `zero_optimization.offload_*` blocks."""
    _prepare_deepspeed_import()
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    return {
        "offload_optimizer": _pydantic_keys(DeepSpeedZeroOffloadOptimizerConfig),
        "offload_param": _pydantic_keys(DeepSpeedZeroOffloadParamConfig),
    }


def _pydantic_keys(model: Any) -> frozenset[str]:
    # DeepSpeed's config models set populate_by_name: a field is accepted by its name and its alias.
    fields = model.model_fields
    return frozenset(fields) | {f.alias for f in fields.values() if f.alias}


def _prepare_deepspeed_import() -> None:
    # DeepSpeed picks its accelerator when first imported and fails to find one on a machine without CUDA.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

"""FSDP2 (torch's `fully_shard`) under the recipes, with one code path for GPUs and for CPU processes.

`accelerate launch` with a `distributed_type: FSDP` config starts the processes with the FSDP settings in
their environment (ACCELERATE_USE_FSDP, FSDP_*). On GPUs Accelerate switches itself to FSDP and
`accelerator.prepare` shards the model with its `fsdp2_prepare_model`. On CPU processes Accelerate 1.15
does not (it switches to FSDP only for GPU-type process groups) and would train an unsharded model
without a word; there `prepare_sharded` below applies the same preparation itself: the plugin Accelerate builds
from the same environment, with the recipe's precision as Accelerate sets it, handed to Accelerate's own
`fsdp2_prepare_model`, which calls `fully_shard` on each decoder layer, the embeddings and head, and the
model, exactly as on a GPU. What differs is only the few lines that call it (Accelerate's
`_prepare_fsdp2` on GPUs: the same plugin, then the optimizer's parameters swapped for the sharded ones)
and the collectives' backend (gloo instead of NCCL), so the CPU tests run the GPU's sharding code.

Everything after the preparation is the recipes' own code on every device:
- an accumulation window defers the reduce-scatter to its last micro-batch with FSDP2's public
  `set_requires_gradient_sync` (core/train/loop.py; Accelerate's `accumulate` does the same on GPUs only);
- checkpoints (core/output/checkpoint_io.py FSDP2IO) are torch.distributed.checkpoint shards in safetensors;
- final/ is the full state dict gathered by torch's `get_model_state_dict`, as
  `accelerator.get_state_dict` gathers it under FSDP2 on GPUs.
A launch that asks for FSDP and leaves the model unsharded stops with FSDPNotApplied.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from recipes.core.config import ConfigError, ConfigProblems
from recipes.core.distributed.fsdp_contract import layout_of, requested, wrap_problems
from recipes.core.model import quantization


class FSDPNotApplied(ConfigError):
    """The launch asks for FSDP but the model would train unsharded."""


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: Any) -> None:
    """Every FSDP2 unit of the model back to its shards (FSDPModule.reshard). A forward without backward
    (evaluation) leaves the units that are not resharded after forward (the model's root, the final norm
    and head) gathered, with their full parameters registered in place of the sharded ones the optimizer
    holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_gradient_sync(model: Any, sync: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (FSDP2's public switch; a no-op for a model
    FSDP2 does not shard). Without it each rank accumulates unsharded gradients until a backward with it."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def plugin_from_env(mixed_precision: str) -> Any:
    """The FSDP plugin Accelerate builds from the launch environment, with the precision set as
    AcceleratorState sets it (bf16: bf16 parameters for compute and bf16 reductions; fp32 masters)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    return plugin


def prepare_sharded(accelerator: Any, model: torch.nn.Module, optimizer: Any, *others: Any) -> tuple:
    """`accelerator.prepare(model, optimizer, *others)` under an FSDP launch: the model comes back sharded
    by FSDP2 (on GPUs by Accelerate, on CPU processes here) and the optimizer over its sharded parameters.
    Raises FSDPNotApplied when it would not be, ConfigProblems for a wrap class the model does not have."""
    if accelerator.is_fsdp2:
        check_wrap_classes(accelerator.state.fsdp_plugin, model)
        prepared = accelerator.prepare(model, optimizer, *others)
    elif accelerator.device.type == "cpu" and accelerator.distributed_type != "DEEPSPEED":
        plugin = plugin_from_env(accelerator.mixed_precision)
        check_version(plugin.fsdp_version)
        check_wrap_classes(plugin, model)
        model = _shard_on_cpu(accelerator, plugin, model, optimizer)
        rest = accelerator.prepare(optimizer, *others)
        prepared = (model, *(rest if isinstance(rest, tuple) else (rest,)))
    else:
        raise FSDPNotApplied(
            f"the launch asks for FSDP, but Accelerate runs these processes as {accelerator.distributed_type} "
            "and would train an unsharded model; launch with an FSDP config with fsdp_version: 2 on GPUs, or on "
            "CPU processes"
        )
    params = dict(prepared[0].named_parameters())
    unsharded = [name for name, p in params.items() if not _is_dtensor(p)]
    if not is_sharded(prepared[0]) or unsharded:
        raise FSDPNotApplied(
            f"the launch asks for FSDP, but after preparation {len(unsharded)} parameters are not sharded "
            f"(e.g. {unsharded[:3]}); this accelerate/torch combination does not shard as this project "
            "expects: install the versions pyproject.toml names"
        )
    shards = {p.device_mesh.size() for p in params.values()}
    precision = (
        "fp32" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} (fp32 masters)"
    )
    accelerator.print(f"FSDP2: parameters sharded over {'/'.join(map(str, shards))} processes in {precision}")
    return prepared


def check_applies(num_processes: int, device_type: str) -> None:
    """Before anything is loaded: an FSDP launch can shard on these processes (on CPU processes it needs a
    process group of at least two; Accelerate would train one CPU process unsharded)."""
    if requested(os.environ) and device_type == "cpu" and num_processes < 2:
        raise FSDPNotApplied(
            "the launch asks for FSDP on 1 CPU process, which has nothing to shard over; launch with "
            "num_processes 2 or more, or without FSDP (accelerate_configs/cpu.yaml)"
        )


def check_version(version: int) -> None:
    if version != 2:
        raise FSDPNotApplied(
            f"fsdp_version {version}: the recipes drive FSDP2 (fully_shard) only; set fsdp_version: 2 in the "
            "accelerate config's fsdp_config"
        )


def check_wrap_classes(plugin: Any, model: torch.nn.Module) -> None:
    """The layer classes FSDP2 wraps. Without fsdp_transformer_layer_cls_to_wrap Accelerate wraps the
    model's own layer classes (`_no_split_modules`), which for encoders such as BERT include the module
    that holds the input embeddings (BertEmbeddings); its preparation also shards those embeddings as a
    unit of their own and fails on them. The recipes wrap the other layer classes then (BertLayer).
    Then the FSDP contract's wrap-class rules, before Accelerate's preparation would stop on a bad class
    with a message that names neither the config key nor the fix."""
    layout = layout_of(model)
    names = plugin.transformer_cls_names_to_wrap
    if not names and layout.embedding_holders & set(layout.layers):
        names = [name for name in layout.layers if name not in layout.embedding_holders]
        plugin.transformer_cls_names_to_wrap = names
    fsdp = {"fsdp_auto_wrap_policy": os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")}
    if names:
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = ",".join(names)
    found = [("accelerate config", *p) for p in wrap_problems(fsdp, type(model).__name__, layout)]
    if found:
        raise ConfigProblems(found)


def _shard_on_cpu(accelerator: Any, plugin: Any, model: torch.nn.Module, optimizer: Any) -> torch.nn.Module:
    """What Accelerate's `_prepare_fsdp2` does on a GPU: its `fsdp2_prepare_model` on the model, then the
    optimizer's parameters replaced by the sharded ones of the same names."""
    from accelerate.utils import fsdp2_prepare_model
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin.set_auto_wrap_policy(model)
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        # Pinned host memory (for fast copies to a GPU) needs an accelerator; CPU processes compute where
        # the offloaded states live, so the offload policy runs unpinned.
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    # The attributes of an Accelerator in FSDP mode that fsdp2_prepare_model reads.
    in_fsdp_mode = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=accelerator.mixed_precision,
        is_main_process=accelerator.is_main_process,
        device=accelerator.device,
        torch_device_mesh=accelerator.torch_device_mesh,
        parallelism_config=accelerator.parallelism_config,
    )
    names = {id(p): name for name, p in model.named_parameters()}
    model = fsdp2_prepare_model(in_fsdp_mode, model)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def plain_norm(norm: Any) -> Any:
    """A gradient norm as a plain tensor (clipping FSDP2's sharded gradients returns a DTensor)."""
    return norm.full_tensor() if _is_dtensor(norm) else norm


# ---------------------------------------------------------------- whole models, on any topology
def full_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """The model's full weights: under FSDP2 gathered into CPU memory of the main process (the others get
    an empty dict), as `accelerator.get_state_dict` does under FSDP2 on GPUs; otherwise
    `accelerator.get_state_dict` (which gathers ZeRO-3 partitions)."""
    if not is_sharded(model):
        return accelerator.get_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)  # units an evaluation left gathered hold full tensors in place of their shards
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied parameters (input and output embeddings) come back gathered once per name: keep the first name,
    # as save_pretrained does for the one tensor an unsharded model holds.
    for alias in _tied_names(model):
        state.pop(alias, None)
    return state


def _tied_names(model: Any) -> dict[str, str]:
    """Each further name of a parameter the model holds under several names, with its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        first.setdefault(id(parameter), name)
    return aliases


def load_full_state_dict(accelerator: Any, model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load weights from `full_state_dict` back into the (prepared) model; under FSDP2 the main process's
    copy is broadcast and each rank keeps its shards."""
    if not is_sharded(model):
        # A quantised base's constants come back as tensors load_state_dict does not take; they are those the
        # model holds already (core/output/checkpoint_io.py AccelerateIO).
        accelerator.unwrap_model(model).load_state_dict(
            state, strict=not quantization.is_quantized_model(model)
        )
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(model)
    if state:  # the main process's copy, without the names of tied parameters (full_state_dict)
        state = {**state, **{alias: state[name] for alias, name in _tied_names(model).items()}}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)

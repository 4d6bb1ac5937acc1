"""How a Checkpointer (core/output/checkpoint.py) writes and reads the training state.

The Checkpointer decides when, where and how atomically a checkpoint is written; a CheckpointIO writes
and reads the model, optimizer and RNG states inside that directory. `AccelerateIO` wraps an Accelerator
(recipes/sft.py, recipes/classify.py), `FSDP2IO` their FSDP2-sharded model and optimizer (`accelerate_io`
picks one); `DeepSpeedEngineIO` a DeepSpeed engine that the recipe drives itself (recipes/sft_pipeline.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from recipes.core.model import quantization


class CheckpointIO(Protocol):
    """Writes and reads the training state of one way of training inside a checkpoint directory."""

    def save_state(self, directory: Path) -> None:
        """Write the training state into `directory`; every rank calls it."""

    def load_state(self, directory: Path) -> None: ...


class AccelerateIO:
    """Accelerate's save_state: model (safetensors), optimizer, RNG states of every rank, sampler.

    A quantised base (QLoRA) is written with its quantisation constants (each block's scale, the 4-bit
    code), which torch's load_state_dict does not take back (`quantized_base`); the run rebuilt them from
    the pretrained model the same way (quantisation is deterministic), so they are left as they are and
    every other tensor is read back (the resume tests compare the runs bit for bit)."""

    def __init__(self, accelerator: Any, quantized_base: bool = False):
        self.accelerator = accelerator
        self.quantized_base = quantized_base

    def save_state(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory), safe_serialization=True)

    def load_state(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory), **({"strict": False} if self.quantized_base else {}))


def accelerate_io(accelerator: Any, model: Any, optimizer: Any) -> CheckpointIO:
    """How an Accelerate recipe's training state is saved: FSDP2IO for a model FSDP2 shards (on GPUs and CPU
    processes alike), otherwise Accelerate's save_state."""
    from recipes.core.distributed.fsdp import is_sharded

    if is_sharded(model):
        return FSDP2IO(model, optimizer, accelerator.process_index)
    return AccelerateIO(accelerator, quantized_base=quantization.is_quantized_model(model))


class FSDP2IO:
    """The shards of an FSDP2 model and of its optimizer states through torch.distributed.checkpoint: every
    rank writes its own shards into safetensors files under `model/` and `optimizer/`, each file carrying
    the shards' offsets as JSON (torch's HuggingFaceStorageWriter), and HuggingFaceStorageReader reads them
    back into this run's shards (any world size). Nothing is unpickled: DCP's default FileSystemReader
    would unpickle its `.metadata` file and every non-tensor entry. The optimizer's hyper-parameters (the
    LR the schedule reached, betas, ...) go to `optimizer_param_groups.json`, the RNG states of each rank
    to `rng_state_<rank>.pt` (tensors and plain values, loaded weights-only). Every rank calls both."""

    MODEL, OPTIMIZER, PARAM_GROUPS = "model", "optimizer", "optimizer_param_groups.json"

    def __init__(self, model: Any, optimizer: Any, process_index: int):
        self.model, self.process_index = model, process_index
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer Accelerate wraps

    def _states(self) -> tuple[dict, dict, dict]:
        """This run's sharded model state, the optimizer's state tensors and its other entries, keyed by
        parameter name (the optimizer's flattened form: `state.<param>.exp_avg`, `param_groups.<param>.lr`)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        from recipes.core.distributed.fsdp import reshard

        reshard(self.model)  # an evaluation leaves the units not resharded after forward gathered
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=flat)
        tensors = {k: v for k, v in optimizer.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in optimizer.items() if not isinstance(v, torch.Tensor)}
        return get_model_state_dict(self.model), tensors, others

    def save_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

        model, tensors, others = self._states()
        for name, state in ((self.MODEL, model), (self.OPTIMIZER, tensors)):
            unique, _ = _untied(state)
            save(
                unique, storage_writer=HuggingFaceStorageWriter(str(directory / name), save_distributed=True)
            )
        if self.process_index == 0:
            (directory / self.PARAM_GROUPS).write_text(json.dumps(others, indent=1) + "\n")
        torch.save(rng_states(), directory / f"rng_state_{self.process_index}.pt")

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model, tensors, _ = self._states()  # this run's shards, which the saved ones are read into
        for name, state in ((self.MODEL, model), (self.OPTIMIZER, tensors)):
            if not (directory / name).is_dir():
                raise FileNotFoundError(f"{directory} holds no FSDP2 {name} shards ({name}/)")
            unique, aliases = _untied(state)
            load(unique, storage_reader=HuggingFaceStorageReader(str(directory / name)))
            state.update({alias: unique[key] for alias, key in aliases.items()})
        set_model_state_dict(self.model, model)
        saved = json.loads((directory / self.PARAM_GROUPS).read_text())
        others = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}  # betas: a tuple
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, {**tensors, **others}, options=flat)
        restore_rng_states(
            torch.load(
                directory / f"rng_state_{self.process_index}.pt", map_location="cpu", weights_only=True
            )
        )


def _untied(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A state dict with each tensor under one name, and the other names of tensors that several entries
    share (tied input and output embeddings): safetensors refuses to write one tensor twice."""
    unique, aliases, first = {}, {}, {}
    for key, value in state.items():
        memory = _memory(value)
        if memory in first:
            aliases[key] = first[memory]
        else:
            first[memory] = key
            unique[key] = value
    return unique, aliases


def _memory(value: Any) -> Any:
    """Where a (sharded) tensor's local data lives; an empty shard (no memory) is only itself."""
    local = getattr(value, "_local_tensor", value)  # a DTensor's shard on this rank
    if not isinstance(local, torch.Tensor) or local.untyped_storage().data_ptr() == 0:
        return id(value)
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.dtype


class DeepSpeedEngineIO:
    """A DeepSpeed engine without an Accelerator, e.g. a PipelineEngine.

    `engine.save_checkpoint` writes into `pytorch_model/` (named as Accelerate names it for DeepSpeed)
    the weights layer by layer (`layer_NN-model_states.pt`, by data-parallel rank 0 of each stage) and
    each stage's optimizer state (`mp_rank_NN_model_states.pt`, or ZeRO shards); `load_checkpoint` reads
    them back and restores the engine's step counters. All ranks write into one directory, so a
    multi-node run needs output_dir on a shared filesystem. RNG states are saved here, per rank; the
    recipe's LR scheduler is tracked by the Checkpointer as in the other recipes.
    """

    TAG = "pytorch_model"

    def __init__(self, engine: Any, process_index: int):
        self.engine, self.process_index = engine, process_index

    def save_state(self, directory: Path) -> None:
        # No `latest` file: the Checkpointer's completion marker says which checkpoint is usable.
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)
        torch.save(rng_states(), directory / f"rng_state_{self.process_index}.pt")

    def load_state(self, directory: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{directory} holds no DeepSpeed engine checkpoint files")
        restore_rng_states(
            torch.load(
                directory / f"rng_state_{self.process_index}.pt", map_location="cpu", weights_only=True
            )
        )


def rng_states() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values, so they load weights-only."""
    numpy_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": numpy_state["state"]["pos"],
        "numpy_has_gauss": numpy_state["has_gauss"],
        "numpy_gauss": numpy_state["gauss"],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": states["numpy_key"].numpy().astype(np.uint32), "pos": states["numpy_pos"]},
            "has_gauss": states["numpy_has_gauss"],
            "gauss": states["numpy_gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

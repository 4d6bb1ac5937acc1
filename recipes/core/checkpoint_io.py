"""How a Checkpointer (core/checkpoint.py) reaches the training state and the other ranks.

The Checkpointer decides when, where and how atomically a checkpoint is written; a CheckpointIO writes
and reads the model, optimizer and RNG states inside that directory and gives the few collectives the
Checkpointer needs. `AccelerateIO` wraps an Accelerator (recipes/sft.py, recipes/classify.py);
`DeepSpeedEngineIO` a DeepSpeed engine that the recipe drives itself (recipes/sft_pipeline.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class CheckpointIO:
    """State files and collectives of one way of training; attributes are named as Accelerate names them."""

    num_processes: int
    process_index: int
    is_main_process: bool

    def wait_for_everyone(self) -> None:
        raise NotImplementedError

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on at least one of them."""
        raise NotImplementedError

    def save_state(self, directory: Path) -> None:
        """Write the training state into `directory`; every rank calls it."""
        raise NotImplementedError

    def load_state(self, directory: Path) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """Release the processes' resources before an early exit."""
        raise NotImplementedError


class AccelerateIO(CheckpointIO):
    """Accelerate's save_state: model (safetensors), optimizer, RNG states of every rank, sampler."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.num_processes, self.process_index = accelerator.num_processes, accelerator.process_index
        self.is_main_process = accelerator.is_main_process

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def any_rank(self, flag: bool) -> bool:
        flags = torch.tensor(float(flag), device=self.accelerator.device)
        return self.accelerator.reduce(flags, reduction="sum").item() > 0

    def save_state(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory), safe_serialization=True)

    def load_state(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))

    def end(self) -> None:
        self.accelerator.end_training()


class DeepSpeedEngineIO(CheckpointIO):
    """A DeepSpeed engine without an Accelerator, e.g. a PipelineEngine.

    Made from the launcher's PartialState before the engine exists (the Checkpointer checks output_dir
    first); set `engine` once deepspeed.initialize has run. `engine.save_checkpoint` writes into
    `pytorch_model/` (named as Accelerate names it for DeepSpeed) the weights layer by layer
    (`layer_NN-model_states.pt`, by data-parallel rank 0 of each stage) and each stage's optimizer state
    (`mp_rank_NN_model_states.pt`, or ZeRO shards); `load_checkpoint` reads them back and restores the
    engine's step counters. All ranks write into one directory, so a multi-node run needs output_dir on
    a shared filesystem. RNG states are saved here, per rank; the recipe's LR scheduler is tracked by the
    Checkpointer as in the other recipes.
    """

    TAG = "pytorch_model"

    def __init__(self, state: Any):
        self.num_processes, self.process_index = state.num_processes, state.process_index
        self.is_main_process = state.is_main_process
        self.device = state.device
        self.engine: Any = None

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        flags = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(flags)
        return flags.item() > 0

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

    def end(self) -> None:
        dist.destroy_process_group()


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

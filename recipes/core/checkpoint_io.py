"""How a Checkpointer (core/checkpoint.py) writes and reads the training state.

The Checkpointer decides when, where and how atomically a checkpoint is written; a CheckpointIO writes
and reads the model, optimizer and RNG states inside that directory. `AccelerateIO` wraps an Accelerator
(recipes/sft.py, recipes/classify.py); `DeepSpeedEngineIO` a DeepSpeed engine that the recipe drives
itself (recipes/sft_pipeline.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class CheckpointIO(Protocol):
    """Writes and reads the training state of one way of training inside a checkpoint directory."""

    def save_state(self, directory: Path) -> None:
        """Write the training state into `directory`; every rank calls it."""

    def load_state(self, directory: Path) -> None: ...


class AccelerateIO:
    """Accelerate's save_state: model (safetensors), optimizer, RNG states of every rank, sampler."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def save_state(self, directory: Path) -> None:
        self.accelerator.save_state(str(directory), safe_serialization=True)

    def load_state(self, directory: Path) -> None:
        self.accelerator.load_state(str(directory))


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

"""Checkpoints that are never half-written, and exact resume from them.

A checkpoint is `output_dir/checkpoint-<step>/`: model, optimizer and RNG states of every rank (written
by a CheckpointIO, core/output/checkpoint_io.py: Accelerate's `save_state`, or a DeepSpeed engine's own
checkpoint in the pipeline recipe), the tracked objects below, `trainer_state.json` (optimizer step,
epoch, micro-batches of that epoch already consumed) and the resolved `config.yaml`. It is written as
`checkpoint-<step>.partial/`, gets the completion marker last (with each file's size and checksum,
core/output/integrity.py) and only then is renamed, so a crash or a
full disk during the write leaves a `.partial` directory that resume skips (and says so) while the
previous checkpoint stays intact. Rotation (save_total_limit) deletes old checkpoints only after the
new one is complete. Which checkpoint a run starts from is core/output/run_dir.py's business.

Objects the recipe adds (the LR scheduler, the best model so far) are passed as `tracked`, saved as
`<name>.pt` and read back with `torch.load(weights_only=True)`: Accelerate's own
`register_for_checkpointing` would unpickle them with weights_only=False. Under Accelerate the model
is safetensors; DeepSpeed engines read their own files (pickles) themselves.

Checkpoints are taken after an optimizer step, so the saved position is always the end of an
accumulation window; a window cut short by a crash is redone from its start after resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from recipes.core.config import save_config
from recipes.core.distributed.ranks import Ranks
from recipes.core.errors import RunStopped
from recipes.core.output.checkpoint_io import CheckpointIO
from recipes.core.output.integrity import file_records
from recipes.core.output.run_dir import (
    MARKER,
    PARTIAL_SUFFIX,
    STATE_FILE,
    Position,
    complete_checkpoints,
    incomplete_checkpoints,
)


class CheckpointWriteFailed(RunStopped):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


class Checkpointer:
    """Writes and reads one run's checkpoints in output_dir."""

    def __init__(
        self,
        io: CheckpointIO,
        ranks: Ranks,
        cfg: Any,
        *,
        total_steps: int,
        tracked: dict[str, Any],
        log=print,
    ):
        """`tracked`: objects with state_dict/load_state_dict saved with every checkpoint (identical on
        every rank); `total_steps`: the run's last step, after which only the final model is saved."""
        self.io, self.ranks, self.cfg, self.log = io, ranks, cfg, log
        self.dir = Path(cfg.output_dir)
        self.total_steps = total_steps
        self.tracked = tracked

    def load(self, checkpoint: Path) -> None:
        """Load a complete checkpoint into the prepared objects and the tracked ones."""
        self.io.load_state(checkpoint)
        for name, obj in self.tracked.items():
            obj.load_state_dict(torch.load(checkpoint / f"{name}.pt", map_location="cpu", weights_only=True))

    def step_done(self, position: Position, batches_per_epoch: int, stopping: bool) -> None:
        """After every optimizer step: save every save_steps, and when the run is stopping (a decision
        all ranks share). Nothing is saved after the last step: the final model is saved next."""
        if position.step >= self.total_steps:
            return
        if stopping or (self.cfg.save_steps > 0 and position.step % self.cfg.save_steps == 0):
            if position.batches_in_epoch >= batches_per_epoch:
                position = Position(position.step, position.epoch + 1, 0)
            self.save(position)

    def save(self, position: Position) -> Path:
        """Write checkpoint-<step> atomically, then rotate. Every rank must call it."""
        ranks = self.ranks
        final = self.dir / f"checkpoint-{position.step}"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if ranks.is_main_process:
            for stale in incomplete_checkpoints(self.dir):
                shutil.rmtree(stale)  # left by a crashed write; never the last complete one
        ranks.wait_for_everyone()
        error = None
        try:
            self.io.save_state(partial)
        # Disk full or no permission (torch.save reports a failed write as a RuntimeError): every rank
        # stops and the last checkpoint stays.
        except (OSError, RuntimeError) as err:
            error = err
        self._stop_if_failed(error, final, position.step)
        if ranks.is_main_process:
            try:
                for name, obj in self.tracked.items():
                    torch.save(obj.state_dict(), partial / f"{name}.pt")
                state = {**dataclasses.asdict(position), "num_processes": ranks.num_processes}
                (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
                save_config(self.cfg, partial / "config.yaml")
                # Sizes and checksums of every file, so that a resume can tell a checkpoint damaged since.
                marker = {"step": position.step, "files": file_records(partial, exclude=MARKER)}
                _write_synced(partial / MARKER, json.dumps(marker, indent=1) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
            except (OSError, RuntimeError) as err:
                error = err
        self._stop_if_failed(error, final, position.step)
        if ranks.is_main_process:
            self._rotate()  # only now that the new checkpoint is complete
        ranks.wait_for_everyone()
        self.log(f"checkpoint saved: {final}")
        return final

    def _stop_if_failed(self, error: Exception | None, final: Path, step: int) -> None:
        if not self.ranks.any(error is not None):
            return
        if self.ranks.is_main_process:  # frees the space a full disk needs back; the marker was never written
            shutil.rmtree(final.with_name(final.name + PARTIAL_SUFFIX), ignore_errors=True)
        complete = complete_checkpoints(self.dir)
        kept = f"the previous checkpoint {complete[-1]} is intact" if complete else "no checkpoint exists yet"
        reason = _reason(error) if error else "it failed on another rank"
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free in {self.dir}"
        raise CheckpointWriteFailed(
            f"writing checkpoint {final} failed at step {step} ({reason}); {kept}. Free space in or fix the "
            "permissions of output_dir, then continue with --resume_from_checkpoint latest"
        )

    def _rotate(self) -> None:
        limit = self.cfg.save_total_limit
        if limit is None:
            return
        complete = complete_checkpoints(self.dir)
        for old in complete[: max(len(complete) - limit, 0)]:
            shutil.rmtree(old)


def _reason(error: Exception) -> str:
    """The cause in one line: the OS error text, or the last line of torch's multi-line write error."""
    text = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return text[:200]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

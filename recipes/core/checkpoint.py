"""Checkpoints that are never half-written, exact resume, and a clean stop on SIGTERM/SIGINT.

A checkpoint is `output_dir/checkpoint-<step>/`: model, optimizer and RNG states of every rank (written
by a CheckpointIO, core/checkpoint_io.py: Accelerate's `save_state`, or a DeepSpeed engine's own
checkpoint in the pipeline recipe), the tracked objects below, `trainer_state.json` (optimizer step,
epoch, micro-batches of that epoch already consumed) and the resolved `config.yaml`. It is written as
`checkpoint-<step>.partial/`, gets the completion marker last and only then is renamed, so a crash or a
full disk during the write leaves a `.partial` directory that resume skips (and says so) while the
previous checkpoint stays intact. Rotation (save_total_limit) deletes old checkpoints only after the
new one is complete.

Objects the recipe adds (the LR scheduler, the best model so far) are registered with `track`, saved as
`<name>.pt` and read back with `torch.load(weights_only=True)`: Accelerate's own
`register_for_checkpointing` would unpickle them with weights_only=False. Under Accelerate the model
is safetensors; DeepSpeed engines read their own files (pickles) themselves.

Checkpoints are taken after an optimizer step, so the saved position is always the end of an
accumulation window; a window cut short by a crash is redone from its start after resume.

On SIGTERM or SIGINT the run finishes the optimizer step in progress, all ranks agree on stopping
(a flag all-reduced once per step), a checkpoint is written and the process exits with status
EXIT_INTERRUPTED (75, "temporary failure: try again"), so a job script can requeue with
`--resume_from_checkpoint latest`. A second signal of the same kind stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from recipes.core.checkpoint_io import AccelerateIO, CheckpointIO
from recipes.core.config import ConfigError, save_config

EXIT_INTERRUPTED = 75
MARKER = "checkpoint_complete.json"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Fields that may differ between the run that wrote a checkpoint (or an output_dir) and the run that
# continues it: they change where and how often things are written, not what is trained. on_nonfinite
# and its limit only act on a step that is not finite, so a run stopped there may continue with skip.
MAY_DIFFER = {
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "save_steps",
    "save_total_limit",
    "report_to",
    "on_nonfinite",
    "max_consecutive_skips",
}


class RunStopped(ConfigError):
    """Training stopped at a step on a problem the message explains; reported like a config error."""


class TrainingDiverged(RunStopped):
    """The loss or gradient norm stopped being finite; usually the learning rate or precision is wrong."""


class CheckpointWriteFailed(RunStopped):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


@dataclasses.dataclass
class Position:
    """Where training stands: optimizer steps done and micro-batches of `epoch` already consumed."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose write finished, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories whose write never finished (no completion marker)."""
    complete = set(complete_checkpoints(output_dir))
    return sorted(p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p not in complete)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = (a.keys() | b.keys()) - MAY_DIFFER
    return sorted(k for k in keys if a.get(k) != b.get(k))


class Checkpointer:
    """Owns the output_dir's checkpoints for one run: check at start, resume, save, stop on signals."""

    def __init__(self, accelerator: Any, cfg: Any, log=print):
        """`accelerator`: an Accelerator, or a CheckpointIO for training without one."""
        self.io = accelerator if isinstance(accelerator, CheckpointIO) else AccelerateIO(accelerator)
        self.cfg, self.log = cfg, log
        self.dir = Path(cfg.output_dir)
        self.total_steps = 0
        self.stop_requested = False
        self.tracked: dict[str, Any] = {}
        if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
            raise ConfigError(
                f"save_total_limit is {cfg.save_total_limit}; it must be at least 1 (the newest checkpoint is "
                "always kept) or null to keep every checkpoint"
            )
        self.resume_dir = self._choose_start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    # ------------------------------------------------------------------ start
    def _choose_start(self) -> Path | None:
        """The checkpoint to resume from (None: start at step 0), after checking the output_dir is usable."""
        cfg = self.cfg
        self._check_writable()
        for path in incomplete_checkpoints(self.dir):
            self.log(f"skipping incomplete checkpoint {path} (its write did not finish)")
        if cfg.resume_from_checkpoint in (None, ""):
            self._check_fresh_start()
            return None
        if cfg.resume_from_checkpoint == "latest":
            complete = complete_checkpoints(self.dir)
            if not complete:
                self.log(f"no complete checkpoint in {self.dir}: starting at step 0")
                self._check_fresh_start()
                return None
            chosen = complete[-1]
        else:
            chosen = Path(cfg.resume_from_checkpoint)
            if not (chosen / MARKER).is_file():
                what = "is incomplete (no completion marker)" if chosen.is_dir() else "does not exist"
                raise ConfigError(
                    f"resume_from_checkpoint {chosen} {what}; pass the path of a complete checkpoint-<step> "
                    f"directory or 'latest' for the newest complete one in output_dir"
                )
        saved = yaml.safe_load((chosen / "config.yaml").read_text())
        changed = config_differences(saved, dataclasses.asdict(cfg))
        if changed:
            raise ConfigError(
                f"cannot resume from {chosen}: the config differs in {', '.join(changed)} "
                f"({', '.join(f'{k}={saved.get(k)!r} there' for k in changed)}); resume with the config "
                "that wrote the checkpoint, or start a new run in another output_dir"
            )
        state = json.loads((chosen / STATE_FILE).read_text())
        if state["num_processes"] != self.io.num_processes:
            raise ConfigError(
                f"cannot resume from {chosen}: it was written by {state['num_processes']} processes and this "
                f"run has {self.io.num_processes}; the data order and position depend on the number "
                "of processes, so launch with the same number"
            )
        return chosen

    def _check_writable(self) -> None:
        probe = self.dir / f".write_probe_{self.io.process_index}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"output_dir {self.dir} is not writable ({err.strerror}); choose a directory this user can "
                "write to with --output_dir, or fix its permissions"
            ) from None

    def _check_fresh_start(self) -> None:
        """A new run must not silently mix its files with another run's."""
        if self.cfg.overwrite_output_dir:
            self.io.wait_for_everyone()
            if self.io.is_main_process:
                for path in [*complete_checkpoints(self.dir), *incomplete_checkpoints(self.dir)]:
                    shutil.rmtree(path)
            self.io.wait_for_everyone()
            return
        old_config = self.dir / "config.yaml"
        if old_config.is_file():
            changed = config_differences(yaml.safe_load(old_config.read_text()), dataclasses.asdict(self.cfg))
            if changed:
                raise ConfigError(
                    f"output_dir {self.dir} holds a run with a different config (differs in "
                    f"{', '.join(changed)}); pick another --output_dir, or pass --overwrite_output_dir true "
                    "to replace that run"
                )
        if complete_checkpoints(self.dir):
            raise ConfigError(
                f"output_dir {self.dir} already holds checkpoints; pass --resume_from_checkpoint latest to "
                "continue that run, or --overwrite_output_dir true to start it over"
            )

    def track(self, **objects: Any) -> None:
        """Save and restore these objects (anything with state_dict/load_state_dict) with every checkpoint."""
        self.tracked.update(objects)

    def resume(self) -> Position:
        """Load the chosen checkpoint into the prepared objects; call after accelerator.prepare and after
        registering the LR scheduler. Returns where the data loop continues."""
        if self.resume_dir is None:
            return Position()
        self.io.load_state(self.resume_dir)
        for name, obj in self.tracked.items():
            obj.load_state_dict(
                torch.load(self.resume_dir / f"{name}.pt", map_location="cpu", weights_only=True)
            )
        state = json.loads((self.resume_dir / STATE_FILE).read_text())
        position = Position(state["step"], state["epoch"], state["batches_in_epoch"])
        self.log(
            f"resumed from {self.resume_dir}: step {position.step}, epoch {position.epoch}, "
            f"{position.batches_in_epoch} micro-batches of that epoch done"
        )
        return position

    @property
    def resume_step(self) -> int | None:
        """Optimizer step of the checkpoint being resumed (records after it are dropped), else None."""
        if self.resume_dir is None:
            return None
        return json.loads((self.resume_dir / STATE_FILE).read_text())["step"]

    # ------------------------------------------------------------------ during training
    def step_done(self, step: int, epoch: int, batches_in_epoch: int, batches_per_epoch: int) -> bool:
        """Call after every optimizer step. Saves every save_steps and when a stop signal arrived on any
        rank; returns True when the run must stop (call exit_interrupted)."""
        stop = self._on_any_rank(self.stop_requested)
        if step >= self.total_steps:
            return False  # the final model is saved next anyway
        if stop or (self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0):
            if batches_in_epoch >= batches_per_epoch:
                epoch, batches_in_epoch = epoch + 1, 0
            self.save(Position(step, epoch, batches_in_epoch))
        return stop

    def require_finite(self, step: int, loss: float, grad_norm: Any) -> None:
        """Stop at the first non-finite loss or gradient norm, before anything of that step is saved."""
        norm = None if grad_norm is None else float(grad_norm)
        if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
            return
        complete = complete_checkpoints(self.dir)
        kept = f"the last good checkpoint is {complete[-1]}" if complete else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged at optimizer step {step}: loss {loss}, grad_norm {norm}; nothing of this "
            f"step was saved and {kept}. Lower learning_rate, add warmup, use max_grad_norm > 0 or fp32, and "
            "check the data of this step"
        )

    def save(self, position: Position) -> Path:
        """Write checkpoint-<step> atomically, then rotate. Every rank must call it."""
        acc = self.io
        final = self.dir / f"checkpoint-{position.step}"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if acc.is_main_process:
            for stale in incomplete_checkpoints(self.dir):
                shutil.rmtree(stale)  # left by a crashed write; never the last complete one
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(partial)
        # Disk full or no permission (torch.save reports a failed write as a RuntimeError): every rank
        # stops and the last checkpoint stays.
        except (OSError, RuntimeError) as err:
            error = err
        self._stop_if_failed(error, final, position.step)
        if acc.is_main_process:
            try:
                for name, obj in self.tracked.items():  # identical on every rank
                    torch.save(obj.state_dict(), partial / f"{name}.pt")
                state = {**dataclasses.asdict(position), "num_processes": acc.num_processes}
                (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
                save_config(self.cfg, partial / "config.yaml")
                _write_synced(partial / MARKER, json.dumps({"step": position.step}) + "\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
            except (OSError, RuntimeError) as err:
                error = err
        self._stop_if_failed(error, final, position.step)
        if acc.is_main_process:
            self._rotate()  # only now that the new checkpoint is complete
        acc.wait_for_everyone()
        self.log(f"checkpoint saved: {final}")
        return final

    def _stop_if_failed(self, error: Exception | None, final: Path, step: int) -> None:
        if not self._on_any_rank(error is not None):
            return
        if self.io.is_main_process:  # frees the space a full disk needs back; the marker was never written
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

    def _on_any_rank(self, flag: bool) -> bool:
        """All ranks agree: True when `flag` is True on at least one of them."""
        return self.io.any_rank(flag)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
        print(
            f"received {signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def exit_interrupted(self, step: int) -> None:
        self.log(
            f"stopped by signal after step {step}; continue with --resume_from_checkpoint latest "
            f"(exit status {EXIT_INTERRUPTED})"
        )
        self.io.end()
        raise SystemExit(EXIT_INTERRUPTED)


def _reason(error: Exception) -> str:
    """The cause in one line: the OS error text, or the last line of torch's multi-line write error."""
    text = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return text[:200]


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

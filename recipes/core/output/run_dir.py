"""Where a run's checkpoints live and which one a run starts from.

A checkpoint is `output_dir/checkpoint-<step>/`, complete once its completion marker exists (written
last by core/output/checkpoint.py). `find_start` runs before anything is loaded and writes nothing: it checks
that output_dir can be written, that a new run does not mix its files with another run's, and picks the
checkpoint to resume: for `latest`, the newest complete one whose files are intact (a damaged one is passed
over with a warning; core/output/integrity.py). It refuses a checkpoint written with another config or
process count, and to train a finished run again. Only once the run's inputs are checked does `claim`
create output_dir and, for a new run in the folder of an old one, remove the old run as a whole (its
TensorBoard event files included), so a run that stops on bad input leaves the old run exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from recipes.core.config import ConfigError
from recipes.core.errors import StoppedWithMainProcess
from recipes.core.output.integrity import find_damage

MARKER = "checkpoint_complete.json"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What runs write into output_dir (core/output/records.py, checkpoint.py, final_model.py, lora.py, the recipes);
# TensorBoard event folders are recognised by their files.
RUN_FILES = {
    "config.yaml",
    "plan.json",
    "metrics.jsonl",
    "ds_config.json",
    "curves.png",
    "eval_results.json",
    "test_predictions.jsonl",
    "completions.jsonl",
    "final",
    "merged",
}
_RUN_ENTRY = re.compile(r"^(checkpoint-\d+(\.partial)?|\.write_probe_\d+)$")
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


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done and micro-batches of `epoch` already consumed."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: at step 0 (checkpoint None) or at the position of a complete checkpoint."""

    checkpoint: Path | None = None
    position: Position = Position()
    replaces: bool = False  # output_dir holds a previous run, which `claim` removes before this one writes

    @property
    def resume_step(self) -> int | None:
        """Optimizer step of the checkpoint being resumed (records after it are dropped), else None."""
        return None if self.checkpoint is None else self.position.step


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


def read_position(checkpoint: Path) -> Position:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return Position(state["step"], state["epoch"], state["batches_in_epoch"])


def find_start(cfg: Any, ranks: Any, log=print) -> Start:
    """Check output_dir and choose the checkpoint to resume; every rank calls it (overwriting waits for all)."""
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ConfigError(
            f"save_total_limit is {cfg.save_total_limit}; it must be at least 1 (the newest checkpoint is "
            "always kept) or null to keep every checkpoint"
        )
    output_dir = Path(cfg.output_dir)
    _check_writable(output_dir)
    for path in incomplete_checkpoints(output_dir):
        log(f"skipping incomplete checkpoint {path} (its write did not finish)")
    if cfg.resume_from_checkpoint in (None, ""):
        return Start(replaces=_check_fresh_start(cfg))
    if cfg.resume_from_checkpoint == "latest":
        complete = complete_checkpoints(output_dir)
        if not complete:
            return _start_over(cfg, output_dir, log)
        chosen = _newest_intact(complete, ranks, log)
    else:
        chosen = Path(cfg.resume_from_checkpoint)
        if not (chosen / MARKER).is_file():
            what = "is incomplete (no completion marker)" if chosen.is_dir() else "does not exist"
            raise ConfigError(
                f"resume_from_checkpoint {chosen} {what}; pass the path of a complete checkpoint-<step> "
                f"directory or 'latest' for the newest complete one in output_dir"
            )
        _newest_intact([chosen], ranks, log)
    saved = yaml.safe_load((chosen / "config.yaml").read_text())
    changed = config_differences(saved, dataclasses.asdict(cfg))
    if changed:
        raise ConfigError(
            f"cannot resume from {chosen}: the config differs in {', '.join(changed)} "
            f"({', '.join(f'{k}={saved.get(k)!r} there' for k in changed)}); resume with the config "
            "that wrote the checkpoint, or start a new run in another output_dir"
        )
    written_by = json.loads((chosen / STATE_FILE).read_text())["num_processes"]
    if written_by != ranks.num_processes:
        raise ConfigError(
            f"cannot resume from {chosen}: it was written by {written_by} processes and this run has "
            f"{ranks.num_processes}; the data order and position depend on the number of processes, so "
            "launch with the same number"
        )
    return Start(chosen, read_position(chosen))


def _start_over(cfg: Any, output_dir: Path, log) -> Start:
    """`latest` without a complete checkpoint: a run preempted before its first checkpoint (or never
    started) starts over, so that requeued jobs keep working; a finished run is never trained again."""
    final = output_dir / "final"
    if final.is_dir() and any(final.iterdir()):
        raise ConfigError(
            f"--resume_from_checkpoint latest: the run in {output_dir} finished (its model is in {final}) "
            "and left no checkpoint to resume, so there is nothing to continue; pick another --output_dir "
            "for a new run, or pass --overwrite_output_dir true (without resume_from_checkpoint) to train "
            "this one again"
        )
    replaces = _check_fresh_start(cfg)
    if replaces:
        log(
            f"no complete checkpoint in {output_dir}: the run there stopped before its first one, so it "
            "starts over at step 0"
        )
    else:
        log(f"no checkpoint in {output_dir} yet: starting at step 0")
    return Start(replaces=replaces)


def _newest_intact(checkpoints: list[Path], ranks: Any, log) -> Path:
    """The newest of `checkpoints` (oldest first) whose files are intact (core/output/integrity.py): the
    main process checks them, warning about each damaged one it passes over, and every process takes its
    choice. None intact stops the run, naming what is wrong with each."""
    chosen, damaged = -1, []
    if ranks.is_main_process:
        for index in reversed(range(len(checkpoints))):
            damage = find_damage(checkpoints[index], MARKER, STATE_FILE)
            if damage is None:
                chosen = index
                break
            damaged.append(f"{checkpoints[index]}: {damage}")
            older = "; trying the one before it" if index else ""
            log(f"warning: checkpoint {checkpoints[index]} is damaged ({damage}){older}")
    chosen = int(ranks.gather(chosen)[0])  # the main process's choice
    if chosen >= 0:
        return checkpoints[chosen]
    if not ranks.is_main_process:
        raise StoppedWithMainProcess("the main process found no intact checkpoint")
    raise ConfigError(
        f"no intact checkpoint to resume from ({'; '.join(damaged)}); restore the damaged files from a "
        "copy, resume from an intact checkpoint-<step> by its path, or start over with "
        "--overwrite_output_dir true"
    )


def claim(output_dir: str | Path, start: Start, ranks: Any) -> None:
    """Make output_dir ready for a run whose inputs are checked: with `start.replaces`, the previous run in
    it is removed as a whole (by the main process, while the others wait), then it is created and each
    process checks that it can write there."""
    output_dir = Path(output_dir)
    ranks.wait_for_everyone()
    if ranks.is_main_process and start.replaces:
        for path in output_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    ranks.wait_for_everyone()
    probe = output_dir / f".write_probe_{ranks.process_index}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise _not_writable(output_dir, err.strerror) from None
    ranks.wait_for_everyone()


def _check_writable(output_dir: Path) -> None:
    """output_dir can be written (or created), checked without writing anything."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _not_writable(output_dir, "Not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _not_writable(output_dir, "Permission denied")


def _not_writable(output_dir: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"output_dir {output_dir} is not writable ({reason}); choose a directory this user can write to "
        "with --output_dir, or fix its permissions"
    )


def _check_fresh_start(cfg: Any) -> bool:
    """A new run must not silently mix its files with another run's. True when output_dir holds a
    previous run that the new one replaces (overwrite_output_dir, or the same config run again)."""
    output_dir = Path(cfg.output_dir)
    entries = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    # Unfinished checkpoints alone are no run to replace: resume passes over them, rotation removes them.
    if not any(_is_run_entry(path) and not path.name.endswith(PARTIAL_SUFFIX) for path in entries):
        return False
    if not cfg.overwrite_output_dir:
        old_config = output_dir / "config.yaml"
        if old_config.is_file():
            changed = config_differences(yaml.safe_load(old_config.read_text()), dataclasses.asdict(cfg))
            if changed:
                raise ConfigError(
                    f"output_dir {output_dir} holds a run with a different config (differs in "
                    f"{', '.join(changed)}); pick another --output_dir, or pass --overwrite_output_dir true "
                    "to replace that run"
                )
        if complete_checkpoints(output_dir):
            raise ConfigError(
                f"output_dir {output_dir} already holds checkpoints; pass --resume_from_checkpoint latest to "
                "continue that run, or --overwrite_output_dir true to start it over"
            )
    foreign = [path.name for path in entries if not _is_run_entry(path)]
    if foreign:
        raise ConfigError(
            f"output_dir {output_dir} holds a previous run, which this run replaces as a whole, and also "
            f"files no run writes ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them "
            "out of it, or pick another --output_dir"
        )
    return True


def _is_run_entry(path: Path) -> bool:
    """A file or folder a run writes into output_dir (TensorBoard folders: event files and the
    hparams.yml Accelerate writes next to them, nothing else)."""
    if path.name in RUN_FILES or _RUN_ENTRY.match(path.name):
        return True
    if path.is_dir() and not path.is_symlink():
        files = [p for p in path.rglob("*") if p.is_file()]
        return bool(files) and all(
            p.name.startswith("events.out.tfevents.") or p.name == "hparams.yml" for p in files
        )
    return False

"""A recipe's exit status, as far as the job script that launched it.

A recipe exits with 0 when it finished, 2 on bad input (config or data: the run stopped before training
or at a step it names, core/errors.py) and 75 when a signal stopped it after a checkpoint (resume with
`--resume_from_checkpoint latest`). `accelerate launch` does not pass these on: every failure of its
processes leaves it with status 1 and a traceback of its own. `recipes launch` is `accelerate launch`
(the same arguments) that exits with the recipe's status instead: it points the processes it starts at a
folder of its own (RECIPES_STATUS_DIR), where each records how it ended, and decides from those records:

    every process that recorded a status ended with 0          -> 0 (the launcher's own status, 0)
    some process stopped on bad input (2)                      -> 2
    the processes that recorded one stopped after a signal    -> 75
    anything else (a crash, a process killed without a word)   -> the launcher's status (1), its message

Under SLURM, `srun` returns the highest status of its tasks, so a job script can requeue on 75 and give
up on 2 (accelerate_configs/slurm_multinode.sbatch does). The pdsh multi-node launcher starts remote
processes over ssh without this folder: there the status is the launcher's.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STATUS_DIR_ENV = "RECIPES_STATUS_DIR"
EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 75  # "temporary failure: try again": stopped by a signal after a checkpoint
MEANING = {
    EXIT_USER_ERROR: "bad input: fix what the error above says and run again",
    EXIT_INTERRUPTED: "stopped by a signal after a checkpoint: continue with --resume_from_checkpoint latest",
}


def record(status: int, message: str = "") -> None:
    """Record how this process ends, when a `recipes launch` asked for it (no-op otherwise)."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if not directory:
        return
    rank = os.environ.get("RANK", "0")
    entry = {"rank": int(rank), "status": status, "message": message[:2000]}
    path = Path(directory) / f"rank-{rank}.json"
    # The record is a courtesy to the launcher: the exit itself must not fail on it.
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(entry) + "\n")


def read(directory: str | Path) -> list[dict]:
    """The records the processes of a launch left in `directory`."""
    return [json.loads(path.read_text()) for path in sorted(Path(directory).glob("rank-*.json"))]


def resolve(launcher_status: int, records: list[dict]) -> int:
    """The status of a launch from the launcher's own and the processes' records (see the module docstring)."""
    if launcher_status == EXIT_OK:
        return EXIT_OK
    ended = {entry["status"] for entry in records} - {EXIT_OK}
    if EXIT_USER_ERROR in ended:
        return EXIT_USER_ERROR
    if ended == {EXIT_INTERRUPTED}:
        return EXIT_INTERRUPTED
    return launcher_status


def launch(argv: list[str]) -> int:
    """Run `accelerate launch argv` in this process and return the recipe's exit status."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recipes-status-") as directory:
        os.environ[STATUS_DIR_ENV] = directory  # the processes the launcher starts inherit it
        failure = None
        try:
            launch_command(args)
            launcher_status = EXIT_OK
        except subprocess.CalledProcessError as err:  # one process, or the DeepSpeed runner
            launcher_status = err.returncode if err.returncode > 0 else 128 - err.returncode
            failure = err
        except SystemExit as err:
            launcher_status = err.code if isinstance(err.code, int) else EXIT_CRASH
            failure = err
        except Exception as err:  # torchrun's ChildFailedError names the failed processes
            launcher_status, failure = EXIT_CRASH, err
        finally:
            os.environ.pop(STATUS_DIR_ENV, None)
        records = read(directory)
    status = resolve(launcher_status, records)
    if status in MEANING:
        print(f"recipes launch: exit status {status}, {MEANING[status]}", file=sys.stderr)
    elif failure is not None:
        print(f"recipes launch: the launch failed (exit status {status}): {failure}", file=sys.stderr)
    return status

"""The processes of a warm launch (helpers.launch): started once by a real `accelerate launch` of one
accelerate config, they run the recipe jobs the tests hand them, one after another, each as
`python recipes/<name>.py <args>` runs it in a process of that launch (its `run_recipe`, its argv, its
exit status), so that a job costs its own work and not a launcher's and every process's imports.

Job n is the file `<queue>/<n>.json`: `[script, args]`, or null to stop. Every process runs it, writes
its output to `<n>.rank<r>.out` and `.err`, then its exit status to `<n>.rank<r>.status`. Between jobs
the process group stays up (the recipes' `end_training` would take it down, and a second group started
in the same processes on the same store would meet the first one's keys) and Accelerate's process-wide
state is reset, as helpers.in_process does for one process; runs made this way equal separate launches
bit for bit (the DDP, ZeRO-3 and FSDP2 jobs of the shared job were checked so).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch.distributed
from accelerate.state import AcceleratorState, GradientState

from recipes.core.errors import run_recipe

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def output_to(out: Path, err: Path):
    """This process's stdout and stderr (the file descriptors, so library and C output too) to files."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def run_job(script: str, args: list[str]) -> int:
    """The exit status `python recipes/<script>.py <args>` would end with."""
    sys.argv = [str(REPO / "recipes" / f"{script}.py"), *args]
    try:
        run_recipe(importlib.import_module(f"recipes.{script}").main)
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # what the interpreter would print before exiting with 1
        traceback.print_exc()
        return 1
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        gc.collect()


def main() -> None:
    queue, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = lambda group=None: None
    n = 0
    while True:
        job = queue / f"{n}.json"
        while not job.exists():
            time.sleep(0.02)
        spec = json.loads(job.read_text())
        if spec is None:
            break
        with output_to(queue / f"{n}.rank{rank}.out", queue / f"{n}.rank{rank}.err"):
            status = run_job(*spec)
        (queue / f"{n}.rank{rank}.status.tmp").write_text(str(status))
        (queue / f"{n}.rank{rank}.status.tmp").rename(queue / f"{n}.rank{rank}.status")
        if status != 0:  # the other processes may wait in a collective: the client ends this launch
            return
        n += 1
    if torch.distributed.is_initialized():
        destroy()


if __name__ == "__main__":
    main()

"""Warm launches for the tests (helpers.launch), both sides of them in one place.

WarmLaunches, in the test process, keeps one real `accelerate launch` of this module per accelerate config
and environment, and hands it jobs. `main` is what that launch's processes run: the jobs one after another,
each as `python recipes/<name>.py <args>` runs it in a process of that launch (its `run_recipe`, its argv,
its exit status), so that a job costs its own work and not a launcher's and every process's imports.

Job n is the file `<queue>/<n>.json`: `[script, args]`, or null to stop; a byte in the pipe
`<queue>/wake.rank<r>` wakes process r to read it, so that an idle launch takes no CPU. Every process runs
it, writes its output to `<n>.rank<r>.out` and `.err`, then its exit status to `<n>.rank<r>.status`.
Between jobs the process group stays up (the recipes' `end_training` would take it down, and a second
group started in the same processes on the same store would meet the first one's keys) and Accelerate's
process-wide state is reset, as helpers.in_process does for one process; runs made this way equal
separate launches bit for bit (tests/test_warm_launches.py, on DDP and ZeRO-3; FSDP2 was checked by hand).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch.distributed
import yaml
from accelerate.state import AcceleratorState, GradientState

from recipes.core.errors import run_recipe
from recipes.core.launch.command import free_port, launch_command

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
    # Opened for writing too, so that the pipe always has a writer and select waits for a byte (a pipe
    # whose last writer closed it would read as ready forever).
    wake = os.open(queue / f"wake.rank{rank}", os.O_RDWR | os.O_NONBLOCK)
    n = 0
    while True:
        job = queue / f"{n}.json"
        while not job.exists():
            select.select([wake], [], [], 1.0)  # the timeout only bounds a wake-up that went missing
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 4096)
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


class WarmLaunches:
    """The test process's side: one launch per accelerate config and environment, whose processes run
    job after job, so that a job does not pay a launcher's and every process's imports (about 6 of a tiny
    job's 8 seconds on 2 cores). A job that fails ends its launch (the next job starts a new one). An idle
    launch of 2 processes holds about 1.3 GiB: at most `keep` stay up, fewer where the machine has less
    than `spare` bytes available, the least recently used ending first."""

    def __init__(self, keep: int = 12, spare: int = 8 * 2**30):
        self.keep, self.spare, self.launches = keep, spare, {}  # key: [launcher, queue, next job, world]
        self.counts = collections.Counter()  # jobs, launches started, and why launches ended early

    def run(self, config: str, script: str, args: list[str], env: dict, timeout: float):
        key = launch_key(config, env)
        if key not in self.launches:
            self._start(key, env)
        self.counts["jobs"] += 1
        self.launches[key] = self.launches.pop(key)  # most recently used last
        launcher, queue, n, world = self.launches[key]
        self.launches[key][2] = n + 1
        (queue / f"{n}.tmp").write_text(json.dumps([script, args]))
        (queue / f"{n}.tmp").rename(queue / f"{n}.json")
        wake(queue, world)
        statuses = [queue / f"{n}.rank{r}.status" for r in range(world)]
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in statuses):
            failed = any(s.exists() and s.read_text() != "0" for s in statuses)
            if failed or launcher.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        codes = [int(s.read_text()) if s.exists() else None for s in statuses]
        output = {
            kind: "".join(
                (queue / f"{n}.rank{r}.{kind}").read_text(errors="replace")
                for r in range(world)
                if (queue / f"{n}.rank{r}.{kind}").exists()
            )
            for kind in ("out", "err")
        }
        returncode = max((c for c in codes if c is not None), default=1)
        if codes != [0] * world:
            returncode = returncode or 1
            self.counts["ended by a failed job"] += 1
            output["err"] += self._end(key)
        return subprocess.CompletedProcess(
            [config, script, *args], returncode, stdout=output["out"], stderr=output["err"]
        )

    def _start(self, key, env: dict) -> None:
        while self.launches and (len(self.launches) >= self.keep or available_memory() < self.spare):
            self.counts[
                f"ended to keep at most {self.keep}"
                if len(self.launches) >= self.keep
                else "ended for memory"
            ] += 1
            self._end(next(iter(self.launches)))
        self.counts["launches"] += 1
        queue = Path(tempfile.mkdtemp(prefix="warm_launch_"))
        config = key[0]
        world = yaml.safe_load(Path(config).read_text())["num_processes"]
        for rank in range(world):
            os.mkfifo(queue / f"wake.rank{rank}")
        cmd = launch_command(str(REPO / "tests" / "launch_pool.py"), [str(queue)], config, port=free_port())
        with open(queue / "launcher.log", "w") as log:  # the launcher keeps its own descriptor
            launcher = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.launches[key] = [launcher, queue, 0, world]

    def _end(self, key) -> str:
        """Stop a launch (a null job, then its process group is killed if it does not exit); its log."""
        launcher, queue, n, world = self.launches.pop(key)
        if launcher.poll() is None:
            (queue / f"{n}.json").write_text("null")
            wake(queue, world)
            # a launcher stops its processes on SIGTERM (and kills those that do not stop)
            for stop in (None, signal.SIGTERM, signal.SIGKILL):
                if stop is not None:
                    os.killpg(launcher.pid, stop)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    launcher.wait(timeout=60)
                    break
        log = (queue / "launcher.log").read_text(errors="replace")
        shutil.rmtree(queue, ignore_errors=True)
        return log[-8000:]

    def end_all(self) -> None:
        for key in list(self.launches):
            self._end(key)


WARM_LAUNCHES = WarmLaunches()


def wake(queue: Path, world: int) -> None:
    """Wake every process of a launch to read its next job; one that has not opened its pipe yet reads
    the job when it does."""
    for rank in range(world):
        try:
            fd = os.open(queue / f"wake.rank{rank}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader yet (ENXIO)
            continue
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
            os.write(fd, b"1")
        os.close(fd)


def launch_key(config: str, env: dict) -> tuple:
    """Which warm launch a job runs in: its accelerate config and environment, less the variables that
    change in the test process without concerning the recipes: pytest's current test, and names starting
    with _ that a library sets for itself (torch's compiler sets _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR
    once a test compiles), which would otherwise start a second launch of every config."""
    kept = ((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST" and not k.startswith("_"))
    return config, tuple(sorted(kept))


def available_memory() -> int:
    """The bytes Linux says a new process could take without swapping (MemAvailable); unbounded elsewhere."""
    try:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 2**62


if __name__ == "__main__":
    main()

"""The command line that runs a recipe: through `accelerate launch`, or plain python for one process."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous next to other runs on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    script: str,
    args: list[str],
    accelerate_config: str | None = None,
    num_processes: int | None = None,
    port: int | None = None,
) -> list[str]:
    """`accelerate launch --config_file C [--main_process_port P] [--num_processes N] script args`, with
    this interpreter; without a config, `python script args`."""
    if accelerate_config is None:
        return [sys.executable, script, *args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, script, *args]

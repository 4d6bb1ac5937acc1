"""Multi-node DeepSpeed on one machine: two `accelerate launch` invocations of the standard-launcher config,
as two machines would run it (machine_rank 0 and 1, one process each, main process at 127.0.0.1), train
together and give the single-node 2-process result (the shared job's ZeRO-2 reference run, which uses the
same ds_configs/zero2.json). The SLURM script is run the same way, with stand-ins for srun/scontrol that
start its per-machine task twice on this machine. The pdsh config and the hostfile cannot be launched
without ssh between machines: they are checked with Accelerate's and DeepSpeed's own parsers and command
builder.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
from helpers import (
    JOB_STEPS,
    OFFLINE,
    REPO,
    assert_same_training,
    finish,
    launch,
    load_plan,
)

from recipes.core.launch.command import free_port

MULTINODE = "accelerate_configs/ds_multinode.yaml"
PDSH = "accelerate_configs/ds_multinode_pdsh.yaml"
SINGLE_NODE = "accelerate_configs/ds_zero2.yaml"  # the same ds_configs/zero2.json on one machine
SLURM = "accelerate_configs/slurm_multinode.sbatch"
# LOGLEVEL=INFO makes torchrun print the rendezvous result (ranks and world size) of each machine.
RENDEZVOUS_LOG = {"LOGLEVEL": "INFO"}


def rendezvous(log: str) -> dict[str, str]:
    """torchrun's report of what this machine joined: its group_rank and the world size."""
    fields = dict(
        re.findall(r"\]\s+(group_rank|group_world_size|global_ranks|global_world_sizes)=(\S+)", log)
    )
    assert len(fields) == 4, log[-4000:]
    return fields


def assert_trained_like_one_machine(ours, reference) -> None:
    plan = load_plan(ours)
    assert plan["world_size"] == 2 and plan["total_optimizer_steps"] == JOB_STEPS
    assert_same_training(ours, reference("zero2"))


@pytest.mark.slow
def test_two_machines_of_one_process_each_train_as_one_world_of_two(reference, tmp_path):
    """Both 'machines' write to one output directory, as nodes sharing a file system do."""
    out, port = tmp_path / "out", free_port()
    args = [*reference.args("zero2"), "--output_dir", str(out)]
    machines = []
    for rank in (0, 1):
        launch_args = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        launch_args += ["--main_process_ip", "127.0.0.1"]
        log = tmp_path / f"machine_{rank}.log"
        proc = launch(MULTINODE, "sft", args, env=RENDEZVOUS_LOG, log=log, port=port, launch_args=launch_args)
        machines.append((proc, log))
    for rank, (proc, log) in enumerate(machines):
        assert rendezvous(finish(proc, log)) == {
            "group_rank": str(rank),
            "group_world_size": "2",
            "global_ranks": f"[{rank}]",
            "global_world_sizes": "[2]",
        }
    assert_trained_like_one_machine(out, reference)


@pytest.mark.slow
def test_slurm_script_starts_one_launcher_per_machine_that_train_together(reference, tmp_path):
    """srun and scontrol are replaced by scripts that do on one machine what SLURM does on two: run the
    task once per node with SLURM_NODEID set, and list the job's host names (rank 0 first)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n'
        'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n',
        "scontrol": '#!/bin/bash\n[[ "$*" == "show hostnames 127.0.0.1,localhost" ]] && printf "127.0.0.1\\nlocalhost\\n"\n',
        "recipes": f'#!/bin/bash\nexec {sys.executable} -m recipes.cli "$@"\n',
    }  # fmt: skip
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out, port = tmp_path / "out", free_port()
    environment = {
        **os.environ, **OFFLINE, **RENDEZVOUS_LOG, "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1,localhost", "GPUS_PER_NODE": "1",
        "MAIN_PROCESS_PORT": str(port),
    }  # fmt: skip
    args = [*reference.args("zero2"), "--output_dir", str(out)]
    # The script runs `accelerate launch` itself: it is started as a job scheduler would start it.
    result = subprocess.run(
        ["bash", SLURM, "recipes/sft.py", *args], cwd=REPO, env=environment, capture_output=True, text=True
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-8000:]
    assert f"machines: 2, processes: 2, main process: 127.0.0.1:{port}" in log
    assert sorted(re.findall(r"\]\s+group_rank=(\d)", log)) == ["0", "1"]
    assert re.findall(r"\]\s+global_world_sizes=(\S+)", log) == ["[2]", "[2]"]
    assert_trained_like_one_machine(out, reference)


def load_accelerate_config(path: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(REPO / path))


def deepspeed_launch_command(config: str, port: int) -> list[str]:
    """The command `accelerate launch` would run for `config`, built by Accelerate itself without running it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / config), "--main_process_port", str(port), "recipes/sft.py"]
    )
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    cmd, _ = prepare_deepspeed_cmd_env(args)
    return cmd


def test_pdsh_config_launches_deepspeed_over_the_example_hostfile():
    from deepspeed.launcher.runner import fetch_hostfile

    config = load_accelerate_config(PDSH)
    ds = config.deepspeed_config
    assert config.distributed_type == "DEEPSPEED" and ds["deepspeed_multinode_launcher"] == "pdsh"
    assert (REPO / ds["deepspeed_config_file"]).is_file()
    hosts = fetch_hostfile(str(REPO / ds["deepspeed_hostfile"]))
    assert hosts is not None and len(hosts) == config.num_machines
    assert sum(hosts.values()) == config.num_processes  # num_processes is the total over all machines
    assert config.main_process_ip == next(iter(hosts))  # the main process runs on the first host
    port = free_port()
    assert deepspeed_launch_command(PDSH, port) == [
        "deepspeed", "--hostfile", ds["deepspeed_hostfile"], "--no_local_rank", "--launcher", "pdsh",
        "--num_gpus", str(config.num_processes // config.num_machines), "--master_addr", config.main_process_ip,
        "--master_port", str(port), "recipes/sft.py",
    ]  # fmt: skip


def test_standard_multinode_config_is_consistent_for_every_machine():
    config = load_accelerate_config(MULTINODE)
    ds = config.deepspeed_config
    assert config.distributed_type == "DEEPSPEED" and ds["deepspeed_multinode_launcher"] == "standard"
    assert (REPO / ds["deepspeed_config_file"]).is_file()
    assert (
        ds["deepspeed_config_file"]
        == load_accelerate_config(SINGLE_NODE).deepspeed_config["deepspeed_config_file"]
    )
    assert config.num_machines > 1 and config.num_processes % config.num_machines == 0
    assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    assert config.mixed_precision in (None, "no")  # precision comes from the recipe only


@pytest.mark.slow  # runs `bash -n`
def test_slurm_script_is_valid_bash_and_names_files_that_exist():
    subprocess.run(["bash", "-n", str(REPO / SLURM)], check=True)
    text = (REPO / SLURM).read_text()
    for path in re.findall(r"(?:accelerate_configs|recipes)/[\w/]+\.(?:yaml|py)", text):
        assert (REPO / path).is_file(), path
    assert '--machine_rank "$SLURM_NODEID"' in text


@pytest.mark.slow  # runs the script with stand-ins
@pytest.mark.parametrize("status", [0, 2, 75])
def test_slurm_script_requeues_a_run_stopped_after_a_checkpoint_and_nothing_else(status, tmp_path):
    """srun's status is its tasks' highest `recipes launch` status: on 75 the script requeues its job and
    exits 75; on 0 and 2 (bad input: running it again would fail again) it does not. A requeued job
    (SLURM_RESTART_COUNT > 0) continues with --resume_from_checkpoint latest."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    shims = {
        "scontrol": f'#!/bin/bash\nif [[ $1 == show ]]; then echo node0; echo node1; else echo "scontrol $*" >> {calls}; fi\n',
        "srun": f'#!/bin/bash\nargs="$*"\necho "srun ${{args//$\'\\n\'/ }}" >> {calls}\nexit {status}\n',
    }  # fmt: skip
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    environment = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1", "SLURM_JOB_ID": "4242",
    }  # fmt: skip
    args = ["recipes/sft.py", "--config", "recipes/configs/sft_smollm2.yaml"]
    for restarts in ("0", "1"):
        calls.unlink(missing_ok=True)
        env = {**environment, "SLURM_RESTART_COUNT": restarts}
        result = subprocess.run(["bash", SLURM, *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == status, result.stderr
        [srun, *rest] = calls.read_text().splitlines()
        assert "exec recipes launch --config_file" in srun
        resumes = srun.endswith(" ".join([*args, "--resume_from_checkpoint", "latest"]))
        assert resumes == (restarts == "1") and srun.endswith(" ".join(args)) != resumes
        assert rest == (["scontrol requeue 4242"] if status == 75 else [])


@pytest.mark.slow  # runs the script with stand-ins
def test_slurm_script_reads_a_long_host_list_without_dying_of_sigpipe(tmp_path):
    """A scheduler that writes 2,000 host names line by line: the script takes the first as the main
    process every time (an early-closing reader under pipefail would fail most of these runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "scontrol": '#!/bin/bash\nfor ((i = 0; i < 2000; i++)); do echo "node$i"; done\n',
        "srun": '#!/bin/bash\necho "main process at ${@: -4:1}"\n',  # the task's main_process_ip argument
    }
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    environment = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2000",
        "SLURM_JOB_NODELIST": "node[0-1999]", "GPUS_PER_NODE": "1",
    }  # fmt: skip
    for _ in range(20):
        result = subprocess.run(["bash", SLURM], cwd=REPO, env=environment, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "machines: 2000, processes: 2000, main process: node0:29500" in result.stdout

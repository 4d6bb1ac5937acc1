"""Multi-node DeepSpeed on one machine: two `accelerate launch` invocations of the standard-launcher config,
as two machines would run it (machine_rank 0 and 1, one process each, main process at 127.0.0.1), train
together and give the single-node 2-process result. The SLURM script is run the same way, with stand-ins
for srun/scontrol that start its per-machine task twice on this machine. The pdsh config and the hostfile
cannot be launched without ssh between machines: they are checked with Accelerate's and DeepSpeed's
own parsers and command builder.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import subprocess
import sys

import pytest
from helpers import REPO, SFT_DATA, load_plan, load_weights, max_weight_diff, offline_env, train_records

MULTINODE = "accelerate_configs/ds_multinode.yaml"
PDSH = "accelerate_configs/ds_multinode_pdsh.yaml"
SLURM = "accelerate_configs/slurm_multinode.sbatch"
SINGLE_NODE = "accelerate_configs/ds_zero2.yaml"  # the same ds_configs/zero2.json on one machine
# 40 samples at micro batch 2 on 2 ranks: 10 batches per rank, GA 3 -> windows 3, 3, 3, 1 = 4 steps.
TRAIN_ARGS = [
    "recipes/sft.py", "--config", "recipes/configs/sft_smollm2.yaml", "--dataset_name", str(SFT_DATA),
    "--max_train_samples", "40", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
    "--num_train_epochs", "1", "--warmup_steps", "1", "--learning_rate", "1e-3", "--max_seq_length", "96",
    "--eval_split", "null", "--seed", "3",
]  # fmt: skip
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    # LOGLEVEL=INFO makes torchrun print the rendezvous result (ranks and world size) of each machine.
    return {**os.environ, **offline_env(), "LOGLEVEL": "INFO", **extra}


def finish(proc: subprocess.Popen, what: str, timeout: int = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{out[-8000:]}")
    return out


def start(cmd: list[str], environment: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_args(model, out_dir) -> list[str]:
    return [*TRAIN_ARGS, "--model_name_or_path", str(model), "--output_dir", str(out_dir)]


@pytest.fixture(scope="module")
def single_node(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_node")
    cmd = [
        *ACCELERATE,
        "--config_file",
        SINGLE_NODE,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]
    finish(start([*cmd, *run_args(tiny_llama, out)], env()), "single-node run")
    return out


@pytest.fixture(scope="module")
def two_machines(tiny_llama, tmp_path_factory):
    """Both 'machines' write to one output directory, as nodes sharing a file system do."""
    out, port = tmp_path_factory.mktemp("two_machines"), free_port()
    procs = []
    for rank in (0, 1):
        cmd = [*ACCELERATE, "--config_file", MULTINODE, "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]  # fmt: skip
        procs.append(start([*cmd, *run_args(tiny_llama, out)], env()))
    logs = [finish(p, f"machine_rank {rank}") for rank, p in enumerate(procs)]
    return out, logs


def rendezvous(log: str) -> dict[str, str]:
    """torchrun's report of what this machine joined: its group_rank and the world size."""
    fields = dict(
        re.findall(r"\]\s+(group_rank|group_world_size|global_ranks|global_world_sizes)=(\S+)", log)
    )
    assert len(fields) == 4, log[-4000:]
    return fields


def assert_same_training(ours, reference) -> None:
    """Same ops on the same data; only the all-reduce implementation differs (shared memory within one
    machine, gloo between machines), which changes float rounding far below 1e-6."""
    plan = load_plan(ours)
    assert plan["world_size"] == 2 and plan["total_optimizer_steps"] == 4
    a, b = train_records(ours), train_records(reference)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-6)
    assert max_weight_diff(load_weights(ours / "final"), load_weights(reference / "final")) <= 1e-6


@pytest.mark.slow
def test_two_machines_of_one_process_each_train_as_one_world_of_two(two_machines, single_node):
    out, logs = two_machines
    for rank, log in enumerate(logs):
        assert rendezvous(log) == {
            "group_rank": str(rank),
            "group_world_size": "2",
            "global_ranks": f"[{rank}]",
            "global_world_sizes": "[2]",
        }
    assert_same_training(out, single_node)


@pytest.mark.slow
def test_slurm_script_starts_one_launcher_per_machine_that_train_together(tiny_llama, single_node, tmp_path):
    """srun and scontrol are replaced by scripts that do on one machine what SLURM does on two: run the
    task once per node with SLURM_NODEID set, and list the job's host names (rank 0 first)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n'
        'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n',
        "scontrol": '#!/bin/bash\n[[ "$*" == "show hostnames 127.0.0.1,localhost" ]] && printf "127.0.0.1\\nlocalhost\\n"\n',
        "accelerate": f'#!/bin/bash\nexec {sys.executable} -m accelerate.commands.accelerate_cli "$@"\n',
    }  # fmt: skip
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out, port = tmp_path / "out", free_port()
    environment = env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,localhost",
        GPUS_PER_NODE="1", MAIN_PROCESS_PORT=str(port),
    )  # fmt: skip
    log = finish(start(["bash", SLURM, *run_args(tiny_llama, out)], environment), "slurm script")
    assert f"machines: 2, processes: 2, main process: 127.0.0.1:{port}" in log
    assert sorted(re.findall(r"\]\s+group_rank=(\d)", log)) == ["0", "1"]
    assert re.findall(r"\]\s+global_world_sizes=(\S+)", log) == ["[2]", "[2]"]
    assert_same_training(out, single_node)


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


def test_slurm_script_is_valid_bash_and_names_files_that_exist():
    subprocess.run(["bash", "-n", str(REPO / SLURM)], check=True)
    text = (REPO / SLURM).read_text()
    for path in re.findall(r"(?:accelerate_configs|recipes)/[\w/]+\.(?:yaml|py)", text):
        assert (REPO / path).is_file(), path
    assert '--machine_rank "$SLURM_NODEID"' in text

"""The doctor's checks of an accelerate config on its own (keys, machines, launcher, rendezvous, DeepSpeed
set inline, and the FSDP contract's rules) and of a DeepSpeed hostfile against it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from recipes.core.config import Problem
from recipes.core.doctor import known_keys
from recipes.core.doctor.findings import Finding, findings, run_rules, unknown_keys
from recipes.core.doctor.fsdp import accelerate_problems as fsdp_problems

REFUSED_NEXT_TO_FILE = "set next to deepspeed_config_file: Accelerate refuses the combination"


def _one_of(choices: Iterable[str]) -> str:
    return f"use one of {', '.join(sorted(choices))}"


def _inline_ds(acc: dict) -> dict:
    return acc.get("deepspeed_config") or {}


def _machines(acc: dict) -> int:
    machines = acc.get("num_machines", 1)
    return machines if isinstance(machines, int) and machines > 0 else 0  # 0: not a usable count


def _accelerate_keys(acc: dict) -> Iterator[Problem]:
    yield from unknown_keys(acc, known_keys.accelerate_keys())
    yield from unknown_keys(_inline_ds(acc), known_keys.accelerate_deepspeed_keys(), "deepspeed_config.")


def _distributed_type(acc: dict) -> Iterator[Problem]:
    dist, known = str(acc.get("distributed_type", "NO")), known_keys.distributed_types()
    if dist not in known:
        yield "distributed_type", f"unknown distributed_type {dist!r}", _one_of(known)


def _machine_layout(acc: dict) -> Iterator[Problem]:
    processes, machines, rank = acc.get("num_processes", 1), _machines(acc), acc.get("machine_rank", 0)
    if isinstance(processes, int) and machines and processes % machines:
        problem = f"{processes} processes are not a multiple of num_machines {machines} "
        problem += "(num_processes is the total over all machines)"
        example = machines * max(1, processes // machines)
        fix = f"set num_processes to num_machines x processes per machine, e.g. {example}"
        yield "num_processes", problem, fix
    if machines and not 0 <= rank < machines:
        fix = f"give each machine a distinct rank from 0 to {machines - 1}"
        yield "machine_rank", f"machine_rank {rank} is outside 0..{machines - 1}", fix
    if machines > 1 and not acc.get("main_process_ip"):
        fix = "set it to the address of the machine with machine_rank 0"
        yield "main_process_ip", f"missing for a {machines}-machine run", fix


def _multinode_launcher(acc: dict) -> Iterator[Problem]:
    launcher, known = _inline_ds(acc).get("deepspeed_multinode_launcher"), known_keys.multinode_launchers()
    if launcher is not None and launcher not in known:
        key = "deepspeed_config.deepspeed_multinode_launcher"
        yield key, f"unknown launcher {launcher!r}", _one_of(known)


def _rendezvous(acc: dict) -> Iterator[Problem]:
    backend = acc.get("rdzv_backend", "static")
    if backend not in known_keys.RDZV_BACKENDS:
        yield "rdzv_backend", f"unknown rendezvous backend {backend!r}", _one_of(known_keys.RDZV_BACKENDS)
    elif _machines(acc) > 1 and backend != "static" and acc.get("same_network"):
        # With same_network Accelerate passes master_addr/port and no rdzv endpoint, so a dynamic
        # backend would rendezvous on each machine's localhost and never meet.
        problem = f"rdzv_backend {backend} contradicts same_network: true, which makes Accelerate pass "
        problem += "master_addr/port instead of the rendezvous endpoint the backend needs"
        fix = "use rdzv_backend: static with same_network: true, or same_network: false with "
        fix += f"rdzv_backend: {backend}"
        yield "rdzv_backend", problem, fix


def _inline_deepspeed(acc: dict) -> Iterator[Problem]:
    ds = _inline_ds(acc)
    if ds.get("deepspeed_config_file"):
        for key in sorted(known_keys.DEEPSPEED_FILE_CONFLICTS & set(ds)):
            fix = "remove it here; set it in the DeepSpeed JSON (or 'auto' there)"
            yield f"deepspeed_config.{key}", REFUSED_NEXT_TO_FILE, fix
        if "mixed_precision" in acc:
            fix = "remove it; the recipe's mixed_precision fills the JSON's bf16/fp16 'auto'"
            yield "mixed_precision", REFUSED_NEXT_TO_FILE, fix
        return
    if ds.get("zero_stage") == 3 and not ds.get("zero3_save_16bit_model"):
        problem = "ZeRO-3 without it: the final save cannot gather the full model"
        yield "deepspeed_config.zero3_save_16bit_model", problem, "set zero3_save_16bit_model: true"
    for part in ("optimizer", "param"):
        if ds.get(f"offload_{part}_device") == "nvme" and not ds.get(f"offload_{part}_nvme_path"):
            problem = f"offload_{part}_device is nvme but no path is given"
            fix = f"set offload_{part}_nvme_path to a directory on a local NVMe drive"
            yield f"deepspeed_config.offload_{part}_nvme_path", problem, fix


ACCELERATE_RULES = [
    _accelerate_keys,
    _distributed_type,
    _machine_layout,
    _multinode_launcher,
    _rendezvous,
    _inline_deepspeed,
    fsdp_problems,
]


def check_accelerate(acc: dict, file: str = "accelerate config") -> list[Finding]:
    return run_rules(file, ACCELERATE_RULES, acc)


def parse_hostfile(text: str) -> dict[str, int]:
    """DeepSpeed hostfile lines `hostname slots=N`; comments and blank lines are skipped."""
    hosts = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match:
            raise ValueError(f"line {number}: expected 'hostname slots=N', got {raw.strip()!r}")
        hosts[match.group(1)] = int(match.group(2))
    return hosts


def check_hostfile(
    hosts: dict[str, int], num_processes: int, num_machines: int, file: str, accelerate_file: str
) -> list[Finding]:
    problems, total = [], sum(hosts.values())
    if total != num_processes:
        slots = " + ".join(str(v) for v in hosts.values()) or "0"
        problem = f"slots sum to {slots} = {total}, but {accelerate_file} has num_processes {num_processes}"
        fix = f"make the slots add up to {num_processes}, or set num_processes: {total}"
        problems.append(("slots", problem, fix))
    if len(hosts) != num_machines:
        problem = f"{len(hosts)} hosts listed, but {accelerate_file} has num_machines {num_machines}"
        fix = f"list one line per machine, or set num_machines: {len(hosts)}"
        problems.append(("hosts", problem, fix))
    return findings(file, problems)

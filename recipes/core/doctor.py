"""Consistency checks of an accelerate config, a DeepSpeed config, a recipe config and a hostfile.

Every check is a pure function over parsed dicts returning `Finding`s (file, key, problem, fix); only
`load_*` touch files. `recipes doctor` prints the findings; `preflight` runs the same checks inside a
recipe at start-up (reading the DeepSpeed config the launcher names in its environment) and raises,
so a bad combination fails in seconds instead of in a DeepSpeed assertion minutes later.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recipes.core.config import ON_NONFINITE_CHOICES, ConfigError
from recipes.core.hardware import get_device
from recipes.core.steps import (
    batches_before_sharding,
    batches_per_rank,
    gradient_accumulation_for,
    optimizer_steps_per_epoch,
)


def _words(text: str) -> set[str]:
    return set(text.split())


# Keys `accelerate launch` accepts in a config file (accelerate's ClusterConfig fields; fp16 and
# dynamo_backend are older spellings it still converts). A test keeps this in step with accelerate.
ACCELERATE_KEYS = _words(
    """
    command_file commands compute_environment debug deepspeed_config distributed_type downcast_bf16
    dynamo_config enable_cpu_affinity fp8_config fsdp_config gpu_ids machine_rank main_process_ip
    main_process_port main_training_function megatron_lm_config mixed_precision mpirun_config
    num_machines num_processes parallelism_config rdzv_backend same_network tpu_env tpu_name
    tpu_use_cluster tpu_use_sudo tpu_vm tpu_zone use_cpu fp16 dynamo_backend
    """
)
ACCELERATE_DEEPSPEED_KEYS = _words(
    """
    deepspeed_config_file zero_stage offload_optimizer_device offload_param_device
    offload_optimizer_nvme_path offload_param_nvme_path gradient_accumulation_steps gradient_clipping
    zero3_init_flag zero3_save_16bit_model deepspeed_hostfile deepspeed_exclusion_filter
    deepspeed_inclusion_filter deepspeed_multinode_launcher deepspeed_moe_layer_cls_names
    """
)
# Accelerate raises when these sit in the accelerate config next to a deepspeed_config_file.
DEEPSPEED_FILE_CONFLICTS = _words(
    """
    gradient_accumulation_steps gradient_clipping zero_stage offload_optimizer_device
    offload_param_device offload_param_nvme_path offload_optimizer_nvme_path zero3_save_16bit_model
    """
)
DISTRIBUTED_TYPES = _words(
    """
    NO MULTI_CPU MULTI_GPU MULTI_NPU MULTI_MLU MULTI_SDAA MULTI_MUSA MULTI_XPU DEEPSPEED FSDP XLA
    MEGATRON_LM MULTI_HPU MULTI_NEURON
    """
)
MULTINODE_LAUNCHERS = {"pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh", "slurm"}
RDZV_BACKENDS = {"static", "c10d", "etcd", "etcd-v2"}
# DeepSpeed config keys (deepspeed/runtime/constants.py and its zero and offload config models).
DEEPSPEED_KEYS = _words(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps gradient_clipping
    steps_per_print wall_clock_breakdown memory_breakdown dump_state prescale_gradients
    gradient_predivide_factor communication_data_type seq_parallel_communication_data_type
    sparse_gradients disable_allgather fp16 bf16 amp torch_autocast data_types zero_optimization
    zero_allow_untested_optimizer zero_force_ds_cpu_optimizer optimizer scheduler
    activation_checkpointing flops_profiler tensorboard wandb csv_monitor comet comms_logger aio
    pipeline checkpoint elasticity autotuning compression_training data_efficiency curriculum_learning
    sparse_attention eigenvalue progressive_layer_drop nebula weight_quantization hybrid_engine
    dataloader_drop_last use_data_before_expert_parallelism graph_harvesting use_node_local_storage
    load_universal compile timers tensor_parallel mics_shard_size mics_hierarchical_params_gather
    zenflow
    """
)
ZERO_KEYS = _words(
    """
    stage allgather_bucket_size allgather_partitions compute_grad_norm contiguous_gradients cpu_offload
    cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint enable_sanity_checks
    ignore_unused_parameters leaf_module legacy_stage1 load_from_fp32_weights log_trace_cache_warnings
    memory_efficient_linear offload_optimizer offload_param overlap_comm override_module_apply
    parameter_alignment pipeline_loading_checkpoint reduce_bucket_size reduce_scatter
    round_robin_gradients save_muon_momentum_buffer_in_memory stage3_allgather_sequential
    stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save
    stage3_max_live_parameters stage3_max_reuse_distance stage3_model_persistence_threshold
    stage3_module_granularity_threshold stage3_param_persistence_threshold stage3_prefetch_bucket_size
    stage3_use_all_reduce_for_fetch_params sub_group_size use_multi_rank_bucket_allreduce zenflow
    zero_hpz_partition_size zero_quantized_gradients zero_quantized_nontrainable_weights
    zero_quantized_weights mics_shard_size mics_hierarchical_params_gather
    """
)
OFFLOAD_KEYS = {
    "offload_optimizer": {
        "device",
        "nvme_path",
        "buffer_count",
        "pin_memory",
        "pipeline_read",
        "pipeline_write",
        "fast_init",
        "ratio",
        "cpuadam_cores_perc",
        "super_offload",
    },
    "offload_param": {"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"},
}


@dataclass(frozen=True)
class Finding:
    file: str
    key: str
    problem: str
    fix: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.problem}\n    fix: {self.fix}"


class DoctorError(ConfigError):
    """Configs that disagree; the message lists every finding."""


def report(findings: list[Finding]) -> str:
    return "\n".join(str(f) for f in findings)


# ---------------------------------------------------------------- loading


def load_config_file(path: str | Path) -> tuple[dict | None, list[Finding]]:
    """Parse a YAML or JSON file; a syntax error or non-mapping is a finding with its line number."""
    path = Path(path)
    if not path.is_file():
        return None, [Finding(str(path), "-", "file does not exist", "pass the path of an existing file")]
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        return None, [
            Finding(
                str(path), "-", f"invalid JSON: {err.msg} (column {err.colno})", _json_fix(err), err.lineno
            )
        ]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = f"invalid YAML: {getattr(err, 'problem', None) or err}"
        return None, [
            Finding(str(path), "-", problem, "fix the syntax at that line", mark.line + 1 if mark else None)
        ]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [
            Finding(str(path), "-", f"holds a {type(data).__name__}, not a mapping", "write key: value pairs")
        ]
    return data, []


def _json_fix(err: json.JSONDecodeError) -> str:
    if "delimiter" in err.msg or "property name" in err.msg:
        return "check commas between entries (none after the last one) and double-quoted keys"
    return "fix the JSON syntax at that line"


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


def key_line(path: str | Path, dotted_key: str) -> int | None:
    """Line of the last component of `dotted_key` in a YAML or JSON file, for pointing at it."""
    name = dotted_key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*\"?{re.escape(name)}\"?\s*:")
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if pattern.match(line):
                return number
    except OSError:
        return None
    return None


def _unknown_keys(data: dict, known: set[str], file: str, prefix: str = "") -> list[Finding]:
    findings = []
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            fix = f"did you mean {close[0]!r}?" if close else "remove it"
            findings.append(Finding(file, prefix + str(key), "unknown key", fix))
    return findings


# ---------------------------------------------------------------- accelerate config


def check_accelerate(acc: dict, file: str = "accelerate config") -> list[Finding]:
    findings = _unknown_keys(acc, ACCELERATE_KEYS, file)
    ds = acc.get("deepspeed_config") or {}
    findings += _unknown_keys(ds, ACCELERATE_DEEPSPEED_KEYS, file, "deepspeed_config.")
    num_processes, num_machines = acc.get("num_processes", 1), acc.get("num_machines", 1)
    machine_rank = acc.get("machine_rank", 0)
    dist = str(acc.get("distributed_type", "NO"))
    if dist not in DISTRIBUTED_TYPES:
        findings.append(
            Finding(
                file,
                "distributed_type",
                f"unknown distributed_type {dist!r}",
                f"use one of {', '.join(sorted(DISTRIBUTED_TYPES))}",
            )
        )
    if isinstance(num_processes, int) and isinstance(num_machines, int) and num_machines > 0:
        if num_processes % num_machines:
            findings.append(
                Finding(
                    file,
                    "num_processes",
                    f"{num_processes} processes are not a multiple of num_machines {num_machines} "
                    "(num_processes is the total over all machines)",
                    f"set num_processes to num_machines x processes per machine, e.g. "
                    f"{num_machines * max(1, num_processes // num_machines)}",
                )
            )
        if not 0 <= machine_rank < num_machines:
            findings.append(
                Finding(
                    file,
                    "machine_rank",
                    f"machine_rank {machine_rank} is outside 0..{num_machines - 1}",
                    f"give each machine a distinct rank from 0 to {num_machines - 1}",
                )
            )
    multi_machine = isinstance(num_machines, int) and num_machines > 1
    if multi_machine and not acc.get("main_process_ip"):
        findings.append(
            Finding(
                file,
                "main_process_ip",
                f"missing for a {num_machines}-machine run",
                "set it to the address of the machine with machine_rank 0",
            )
        )
    launcher = ds.get("deepspeed_multinode_launcher")
    if launcher is not None and launcher not in MULTINODE_LAUNCHERS:
        findings.append(
            Finding(
                file,
                "deepspeed_config.deepspeed_multinode_launcher",
                f"unknown launcher {launcher!r}",
                f"use one of {', '.join(sorted(MULTINODE_LAUNCHERS))}",
            )
        )
    findings += _check_rendezvous(acc, file, multi_machine)
    findings += _check_accelerate_deepspeed(acc, ds, file)
    return findings


def _check_rendezvous(acc: dict, file: str, multi_machine: bool) -> list[Finding]:
    backend = acc.get("rdzv_backend", "static")
    if backend not in RDZV_BACKENDS:
        return [
            Finding(
                file,
                "rdzv_backend",
                f"unknown rendezvous backend {backend!r}",
                f"use one of {', '.join(sorted(RDZV_BACKENDS))}",
            )
        ]
    if multi_machine and backend != "static" and acc.get("same_network"):
        # With same_network Accelerate passes master_addr/port and no rdzv endpoint, so a dynamic
        # backend would rendezvous on each machine's localhost and never meet.
        return [
            Finding(
                file,
                "rdzv_backend",
                f"rdzv_backend {backend} contradicts same_network: true, which makes Accelerate pass "
                "master_addr/port instead of the rendezvous endpoint the backend needs",
                "use rdzv_backend: static with same_network: true, or same_network: false with "
                f"rdzv_backend: {backend}",
            )
        ]
    return []


def _check_accelerate_deepspeed(acc: dict, ds: dict, file: str) -> list[Finding]:
    findings = []
    if ds.get("deepspeed_config_file"):
        for key in sorted(DEEPSPEED_FILE_CONFLICTS & set(ds)):
            findings.append(
                Finding(
                    file,
                    f"deepspeed_config.{key}",
                    "set next to deepspeed_config_file: Accelerate refuses the combination",
                    "remove it here; set it in the DeepSpeed JSON (or 'auto' there)",
                )
            )
        if "mixed_precision" in acc:
            findings.append(
                Finding(
                    file,
                    "mixed_precision",
                    "set next to deepspeed_config_file: Accelerate refuses the combination",
                    "remove it; the recipe's mixed_precision fills the JSON's bf16/fp16 'auto'",
                )
            )
        return findings
    if ds.get("zero_stage") == 3 and not ds.get("zero3_save_16bit_model"):
        findings.append(
            Finding(
                file,
                "deepspeed_config.zero3_save_16bit_model",
                "ZeRO-3 without it: the final save cannot gather the full model",
                "set zero3_save_16bit_model: true",
            )
        )
    for part in ("optimizer", "param"):
        if ds.get(f"offload_{part}_device") == "nvme" and not ds.get(f"offload_{part}_nvme_path"):
            findings.append(
                Finding(
                    file,
                    f"deepspeed_config.offload_{part}_nvme_path",
                    f"offload_{part}_device is nvme but no path is given",
                    f"set offload_{part}_nvme_path to a directory on a local NVMe drive",
                )
            )
    return findings


def check_hostfile(
    hosts: dict[str, int], num_processes: int, num_machines: int, file: str, accelerate_file: str
) -> list[Finding]:
    findings = []
    total = sum(hosts.values())
    if total != num_processes:
        slots = " + ".join(str(v) for v in hosts.values()) or "0"
        findings.append(
            Finding(
                file,
                "slots",
                f"slots sum to {slots} = {total}, but {accelerate_file} has num_processes {num_processes}",
                f"make the slots add up to {num_processes}, or set num_processes: {total}",
            )
        )
    if len(hosts) != num_machines:
        findings.append(
            Finding(
                file,
                "hosts",
                f"{len(hosts)} hosts listed, but {accelerate_file} has num_machines {num_machines}",
                f"list one line per machine, or set num_machines: {len(hosts)}",
            )
        )
    return findings


# ---------------------------------------------------------------- DeepSpeed config


def _enabled(ds: dict, precision: str) -> bool | None:
    """True/False when the DS config says so explicitly; None for absent or 'auto'."""
    block = ds.get(precision)
    value = block.get("enabled") if isinstance(block, dict) else None
    return value if isinstance(value, bool) else None


def pipeline_stages(ds: dict | None, recipe: dict | None) -> int:
    stages = ((ds or {}).get("pipeline") or {}).get("stages")
    if isinstance(stages, int):
        return stages
    return int((recipe or {}).get("pipeline_stages") or 1)


def check_deepspeed(ds: dict, file: str = "DeepSpeed config") -> list[Finding]:
    """Checks of the DeepSpeed JSON on its own."""
    findings = _unknown_keys(ds, DEEPSPEED_KEYS, file)
    zero = ds.get("zero_optimization") or {}
    findings += _unknown_keys(zero, ZERO_KEYS, file, "zero_optimization.")
    for part, known in OFFLOAD_KEYS.items():
        block = zero.get(part) or {}
        findings += _unknown_keys(block, known, file, f"zero_optimization.{part}.")
        if block.get("device") == "nvme" and not block.get("nvme_path"):
            findings.append(
                Finding(
                    file,
                    f"zero_optimization.{part}.nvme_path",
                    "device is nvme but no path is given",
                    "set nvme_path to a directory on a local NVMe drive",
                )
            )
    if _enabled(ds, "bf16") and _enabled(ds, "fp16"):
        findings.append(
            Finding(
                file,
                "bf16.enabled",
                "bf16 and fp16 are both enabled",
                'set both to "auto" and choose mixed_precision in the recipe YAML',
            )
        )
    for block in ("scheduler", "optimizer"):
        if block in ds:
            findings.append(
                Finding(
                    file,
                    block,
                    f"a DeepSpeed {block} block next to the recipe's own {block}: DeepSpeed raises, or "
                    f"the run uses a {block} the recipe's plan does not describe",
                    f"remove the {block} block; the recipe YAML sets the learning rate, warmup and AdamW settings",
                )
            )
    stage = zero.get("stage", 0)
    if stage == 3:
        gather = zero.get(
            "stage3_gather_16bit_weights_on_model_save", zero.get("stage3_gather_fp16_weights_on_model_save")
        )
        if gather is not True:
            findings.append(
                Finding(
                    file,
                    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
                    "ZeRO-3 without it (Accelerate fills 'auto' with false): the final save "
                    "cannot gather the full model",
                    "set it to true",
                )
            )
    return findings


def check_deepspeed_with_run(
    ds: dict,
    recipe: dict,
    world_size: int,
    file: str = "DeepSpeed config",
    recipe_file: str = "recipe config",
) -> list[Finding]:
    """Checks of the DeepSpeed JSON against the recipe's batch settings and the world size."""
    findings = []
    stages = pipeline_stages(ds, recipe)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stages > 1 and stage in (2, 3):
        findings.append(
            Finding(
                file,
                "zero_optimization.stage",
                f"ZeRO-{stage} with {stages} pipeline stages: DeepSpeed supports only ZeRO-0/1 "
                "with pipeline parallelism",
                "use stage 1 (or 0) for pipeline runs",
            )
        )
    if world_size % stages:
        findings.append(
            Finding(
                file,
                "pipeline.stages",
                f"{stages} stages do not divide the world size {world_size}",
                f"use a world size that is a multiple of {stages}",
            )
        )
        return findings
    dp = world_size // stages
    micro = recipe.get("per_device_train_batch_size", 8)
    ga = _recipe_ga(recipe, dp)
    ds_micro, ds_ga, ds_train = (
        ds.get(k)
        for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    )
    if isinstance(ds_micro, int) and ds_micro != micro:
        findings.append(
            Finding(
                file,
                "train_micro_batch_size_per_gpu",
                f"{ds_micro} differs from the recipe's per_device_train_batch_size {micro}",
                'set it to "auto" (the recipe\'s value is used)',
            )
        )
    if isinstance(ds_ga, int) and ga is not None and ds_ga != ga:
        findings.append(
            Finding(
                file,
                "gradient_accumulation_steps",
                f"{ds_ga} differs from the recipe's gradient accumulation {ga}; DeepSpeed's wins "
                "and the run no longer matches its plan",
                'set it to "auto"',
            )
        )
    if isinstance(ds_train, int):
        micro_eff = ds_micro if isinstance(ds_micro, int) else micro
        ga_eff = ds_ga if isinstance(ds_ga, int) else ga
        if ga_eff is not None and ds_train != micro_eff * ga_eff * dp:
            findings.append(
                Finding(
                    file,
                    "train_batch_size",
                    f"{ds_train} is not micro x GA x data-parallel size = {micro_eff} x {ga_eff} x "
                    f"{dp} = {micro_eff * ga_eff * dp}",
                    'set it to "auto"',
                )
            )
    precision = recipe.get("mixed_precision", "no")
    for name in ("bf16", "fp16"):
        if _enabled(ds, name) is True and precision != name:
            findings.append(
                Finding(
                    file,
                    f"{name}.enabled",
                    f"enabled here, but the recipe's mixed_precision is {precision!r}",
                    f'set it to "auto" and mixed_precision: {name} in {recipe_file}',
                )
            )
    return findings


def _recipe_ga(recipe: dict, dp: int) -> int | None:
    gbs, micro = recipe.get("global_batch_size"), recipe.get("per_device_train_batch_size", 8)
    if gbs:
        return gbs // (micro * dp) if gbs % (micro * dp) == 0 else None
    return recipe.get("gradient_accumulation_steps", 1)


# ---------------------------------------------------------------- recipe config


def check_recipe(
    recipe: dict,
    world_size: int,
    file: str = "recipe config",
    keys_in_file: set[str] | None = None,
    num_samples: int | None = None,
    pipeline: int = 1,
) -> list[Finding]:
    """Batch and schedule checks of the resolved recipe values (defaults filled in)."""
    findings = []
    micro, gbs = recipe.get("per_device_train_batch_size", 8), recipe.get("global_batch_size")
    dp = world_size // pipeline if world_size % pipeline == 0 else world_size
    if gbs:
        try:
            gradient_accumulation_for(gbs, micro, dp)
        except ValueError as err:  # the same message the recipe's arithmetic gives, split into problem/fix
            problem, _, fix = str(err).removeprefix("global_batch_size ").partition("; ")
            findings.append(Finding(file, "global_batch_size", problem, fix))
    ga = _recipe_ga(recipe, dp) or 1
    max_steps, warmup = recipe.get("max_steps", -1), recipe.get("warmup_steps", 0)
    steps_per_epoch = None
    if num_samples is not None:
        batches = batches_before_sharding(num_samples, micro, recipe.get("dataloader_drop_last", False))
        steps_per_epoch = optimizer_steps_per_epoch(max(1, batches_per_rank(batches, dp)), ga)
    total = max_steps if max_steps > 0 else None
    if total is None and steps_per_epoch is not None:
        total = math.ceil(recipe.get("num_train_epochs", 1.0) * steps_per_epoch)
    if total is not None and warmup > total:
        findings.append(
            Finding(
                file,
                "warmup_steps",
                f"{warmup} warmup steps, but training has only {total} steps: the learning rate never decays",
                f"use at most {total} warmup steps (fewer, for the learning rate to decay)",
            )
        )
    if recipe.get("warmup_ratio", 0.0) >= 1.0:
        findings.append(
            Finding(
                file,
                "warmup_ratio",
                "a warmup ratio of 1 or more makes the whole run warmup",
                "use a ratio below 1, e.g. 0.1",
            )
        )
    epochs_set = keys_in_file is None or "num_train_epochs" in keys_in_file
    if max_steps > 0 and epochs_set and steps_per_epoch is not None and max_steps < steps_per_epoch:
        findings.append(
            Finding(
                file,
                "max_steps",
                f"max_steps {max_steps} ends before one epoch ({steps_per_epoch} steps) while "
                f"num_train_epochs is {recipe.get('num_train_epochs')}: max_steps wins",
                "remove num_train_epochs to make the choice explicit, or remove max_steps to "
                "train whole epochs",
            )
        )
    return findings


def check_nonfinite(recipe: dict, deepspeed: bool, file: str = "recipe config") -> list[Finding]:
    """on_nonfinite is a known choice, and skip runs only where the recipe itself applies each update."""
    choice = recipe.get("on_nonfinite", "stop")
    if choice not in ON_NONFINITE_CHOICES:
        return [
            Finding(
                file,
                "on_nonfinite",
                f"{choice!r} is not one of {', '.join(ON_NONFINITE_CHOICES)}",
                "use stop (the run stops at a non-finite step) or skip (that step's update is dropped and "
                "training continues)",
            )
        ]
    if choice != "skip":
        return []
    findings = []
    if deepspeed:
        findings.append(
            Finding(
                file,
                "on_nonfinite",
                "skip cannot be honoured under DeepSpeed: its backward applies the optimizer step "
                "(engine.step) before the recipe sees the loss or the gradient norm",
                "use on_nonfinite: stop (the run stops at that step and keeps the last good checkpoint), "
                "or launch without DeepSpeed (DDP: accelerate_configs/multi_gpu.yaml)",
            )
        )
    if recipe.get("mixed_precision") == "fp16":
        findings.append(
            Finding(
                file,
                "on_nonfinite",
                "skip does not combine with fp16: its loss scaler skips overflowing steps itself and lowers "
                "the scale only on the steps it sees",
                "use mixed_precision: bf16 or no, or on_nonfinite: stop",
            )
        )
    limit = recipe.get("max_consecutive_skips", 1)
    if limit < 1:
        findings.append(
            Finding(
                file,
                "max_consecutive_skips",
                f"{limit} would stop the run before any step is skipped",
                "use at least 1 (the run stops after that many skipped steps in a row)",
            )
        )
    return findings


def check_precision_on_device(precision: str, gpu: str, file: str, key: str) -> list[Finding]:
    device = get_device(gpu)
    if precision in ("bf16", "fp16") and not device.supports(precision):
        has = [p for p in ("bf16", "fp16") if device.supports(p)]
        return [
            Finding(
                file,
                key,
                f"{precision} is not supported by {device.name}",
                f"use {' or '.join(has) if has else 'no'} mixed precision on {device.name}",
            )
        ]
    return []


# ---------------------------------------------------------------- whole diagnosis


def diagnose(
    accelerate_config: str | None = None,
    deepspeed_config: str | None = None,
    recipe_config: str | None = None,
    recipe_fields: set[str] | None = None,
    recipe_defaults: dict | None = None,
    hostfile: str | None = None,
    gpu: str | None = None,
    num_samples: int | None = None,
) -> list[Finding]:
    """Load the given files and run every check that applies to them.

    The DeepSpeed config is the one given, else the one the accelerate config names, else the
    recipe's own `deepspeed_config` field (recipes that drive DeepSpeed themselves)."""
    findings: list[Finding] = []
    acc = ds = recipe = raw = None
    world_size = 1
    if recipe_config:
        raw, errors = load_config_file(recipe_config)
        findings += errors
        if raw is not None:
            if recipe_fields is not None:
                findings += _unknown_keys(raw, recipe_fields, recipe_config)
            recipe = {**(recipe_defaults or {}), **raw}
    if accelerate_config:
        acc, errors = load_config_file(accelerate_config)
        findings += errors
        if acc is not None:
            findings += check_accelerate(acc, accelerate_config)
            world_size = acc.get("num_processes", 1) if isinstance(acc.get("num_processes"), int) else 1
            acc_ds = acc.get("deepspeed_config") or {}
            deepspeed_config = deepspeed_config or acc_ds.get("deepspeed_config_file")
            hostfile = hostfile or acc_ds.get("deepspeed_hostfile")
    deepspeed_config = deepspeed_config or (recipe or {}).get("deepspeed_config")
    if deepspeed_config:
        ds, errors = load_config_file(deepspeed_config)
        findings += errors
        if ds is not None:
            findings += check_deepspeed(ds, deepspeed_config)
    if hostfile and acc is not None:
        try:
            hosts = parse_hostfile(Path(hostfile).read_text())
            num_machines = acc.get("num_machines", 1)
            findings += check_hostfile(hosts, world_size, num_machines, hostfile, accelerate_config or "")
        except (OSError, ValueError) as err:
            findings.append(Finding(hostfile, "-", str(err), "write one 'hostname slots=N' per line"))
    if recipe is not None:
        stages = pipeline_stages(ds, recipe)
        findings += check_recipe(recipe, world_size, recipe_config, set(raw), num_samples, stages)
        deepspeed = ds is not None or (acc or {}).get("distributed_type") == "DEEPSPEED"
        findings += check_nonfinite(recipe, deepspeed, recipe_config)
        if ds is not None:
            findings += check_deepspeed_with_run(ds, recipe, world_size, deepspeed_config, recipe_config)
    if gpu:
        precision = (recipe or {}).get("mixed_precision", "no")
        findings += check_precision_on_device(
            precision, gpu, recipe_config or "recipe config", "mixed_precision"
        )
        for name in ("bf16", "fp16"):
            if ds is not None and _enabled(ds, name):
                findings += check_precision_on_device(name, gpu, deepspeed_config, f"{name}.enabled")
    return [dataclasses.replace(f, line=f.line or key_line(f.file, f.key)) for f in findings]


def preflight(cfg: Any, world_size: int, env: dict[str, str] | None = None) -> None:
    """Run the doctor's checks inside a recipe: the recipe config plus the DeepSpeed config that
    `accelerate launch` names in the environment. Raises DoctorError listing every finding."""
    env = os.environ if env is None else env
    recipe = dataclasses.asdict(cfg)
    findings: list[Finding] = []
    uses_deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if uses_deepspeed else None
    ds_file = ds_file or recipe.get("deepspeed_config")  # recipes that drive DeepSpeed themselves
    ds = None
    if ds_file:
        ds, errors = load_config_file(ds_file)
        findings += errors
        if ds is not None:
            findings += check_deepspeed(ds, ds_file) + check_deepspeed_with_run(
                ds, recipe, world_size, ds_file
            )
    if uses_deepspeed and ds_file:
        # Accelerate refuses these next to a config file, with a message that does not name the file.
        from_accelerate = set(filter(None, env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")))
        for key in sorted(from_accelerate & (DEEPSPEED_FILE_CONFLICTS | {"mixed_precision"})):
            problem = "set next to deepspeed_config_file: Accelerate refuses the combination"
            findings.append(
                Finding("accelerate config", key, problem, "remove it from the accelerate config")
            )
    findings = check_recipe(recipe, world_size, pipeline=pipeline_stages(ds, recipe)) + findings
    findings += check_nonfinite(recipe, deepspeed=uses_deepspeed or bool(ds_file))
    if findings:
        raise DoctorError(f"{len(findings)} config problem(s) found before training:\n{report(findings)}")

"""Consistency checks of an accelerate config, a DeepSpeed config, a recipe config and a hostfile.

Each rule is a small function over parsed dicts that yields (key, problem, fix); a `check_*` function
runs one config kind's rules and `findings` turns what they yield into Findings (file, key, problem,
fix and the key's line in that file). `recipes doctor` prints them (`diagnose`); `preflight` runs the
same checks inside a recipe at start-up and raises, so a bad combination fails in seconds instead of in
a DeepSpeed assertion minutes later. Valid keys come from Accelerate's and DeepSpeed's own config
classes (known_keys.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.core.config import ON_NONFINITE_CHOICES, ConfigError, ConfigFileError, read_mapping
from recipes.core.doctor import fsdp as fsdp_rules
from recipes.core.doctor import known_keys
from recipes.core.plan.hardware import get_device
from recipes.core.plan.steps import (
    batches_before_sharding,
    batches_per_rank,
    optimizer_steps_per_epoch,
    resolve_gradient_accumulation,
)

# What a rule yields: (key, problem, fix). `findings` adds the file and the key's line.
Problem = tuple[str, str, str]


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


def findings(file: str, problems: Iterable[Problem]) -> list[Finding]:
    """The one way a Finding is made: a rule's problems in `file`, each pointing at its key's line."""
    return [Finding(file, key, problem, fix, key_line(file, key)) for key, problem, fix in problems]


def unknown_keys(data: dict, known: Collection[str], prefix: str = "") -> Iterator[Problem]:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            yield prefix + str(key), "unknown key", f"did you mean {close[0]!r}?" if close else "remove it"


def load_config_file(path: str | Path) -> tuple[dict | None, list[Finding]]:
    """Parse a YAML or JSON file; a syntax error or non-mapping is a finding with its line number."""
    try:
        return read_mapping(path), []
    except ConfigFileError as err:
        return None, [Finding(str(path), "-", err.problem, err.fix, err.line)]


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


# ---------------------------------------------------------------- rules


REFUSED_NEXT_TO_FILE = "set next to deepspeed_config_file: Accelerate refuses the combination"
GATHER_ON_SAVE = (  # DeepSpeed's spellings of one ZeRO-3 setting: alias, field name, deprecated name
    "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
)


def _run(file: str, rules: Iterable[Callable[[dict], Iterable[Problem]]], data: dict) -> list[Finding]:
    return findings(file, (problem for rule in rules for problem in rule(data)))


def _one_of(choices: Iterable[str]) -> str:
    return f"use one of {', '.join(sorted(choices))}"


# ---------------------------------------------------------------- accelerate config


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
    fsdp_rules.accelerate_problems,
]


def check_accelerate(acc: dict, file: str = "accelerate config") -> list[Finding]:
    return _run(file, ACCELERATE_RULES, acc)


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


# ---------------------------------------------------------------- DeepSpeed config


def _zero(ds: dict) -> dict:
    return ds.get("zero_optimization") or {}


def precision_enabled(ds: dict, precision: str) -> bool | None:
    """True/False when the DS config says so explicitly; None for absent or 'auto'."""
    block = ds.get(precision)
    value = block.get("enabled") if isinstance(block, dict) else None
    return value if isinstance(value, bool) else None


def pipeline_stages(ds: dict | None, recipe: dict | None) -> int:
    stages = ((ds or {}).get("pipeline") or {}).get("stages")
    if isinstance(stages, int):
        return stages
    return int((recipe or {}).get("pipeline_stages") or 1)


def _deepspeed_keys(ds: dict) -> Iterator[Problem]:
    yield from unknown_keys(ds, known_keys.DEEPSPEED_KEYS)
    yield from unknown_keys(_zero(ds), known_keys.zero_keys(), "zero_optimization.")
    for part, known in known_keys.offload_keys().items():
        yield from unknown_keys(_zero(ds).get(part) or {}, known, f"zero_optimization.{part}.")


def _offload_nvme_paths(ds: dict) -> Iterator[Problem]:
    for part in ("offload_optimizer", "offload_param"):
        block = _zero(ds).get(part) or {}
        if block.get("device") == "nvme" and not block.get("nvme_path"):
            fix = "set nvme_path to a directory on a local NVMe drive"
            yield f"zero_optimization.{part}.nvme_path", "device is nvme but no path is given", fix


def _both_precisions(ds: dict) -> Iterator[Problem]:
    if precision_enabled(ds, "bf16") and precision_enabled(ds, "fp16"):
        fix = 'set both to "auto" and choose mixed_precision in the recipe YAML'
        yield "bf16.enabled", "bf16 and fp16 are both enabled", fix


def _own_scheduler_and_optimizer(ds: dict) -> Iterator[Problem]:
    for block in (b for b in ("scheduler", "optimizer") if b in ds):
        problem = f"a DeepSpeed {block} block next to the recipe's own {block}: DeepSpeed raises, or "
        problem += f"the run uses a {block} the recipe's plan does not describe"
        fix = f"remove the {block} block; the recipe YAML sets the learning rate, warmup and AdamW settings"
        yield block, problem, fix


def _zero3_gather_on_save(ds: dict) -> Iterator[Problem]:
    zero = _zero(ds)
    gather = next((zero[key] for key in GATHER_ON_SAVE if key in zero), None)
    if zero.get("stage", 0) == 3 and gather is not True:
        problem = "ZeRO-3 without it (Accelerate fills 'auto' with false): the final save "
        problem += "cannot gather the full model"
        yield f"zero_optimization.{GATHER_ON_SAVE[0]}", problem, "set it to true"


def zero3_init_problems(ds: dict, zero3_init_flag: Any) -> list[Problem]:
    """ZeRO-3 must build the model partitioned (zero.Init, Accelerate's zero3_init_flag, true by default
    for a ZeRO-3 config): otherwise every process loads the whole model before DeepSpeed partitions it."""
    if _zero(ds).get("stage", 0) != 3 or str(zero3_init_flag).lower() != "false":
        return []
    problem = "false under ZeRO-3: every process loads the whole model before it is partitioned, so a "
    problem += "model that does not fit on one device cannot load"
    return [("deepspeed_config.zero3_init_flag", problem, "remove it or set it to true")]


DEEPSPEED_RULES = [
    _deepspeed_keys,
    _offload_nvme_paths,
    _both_precisions,
    _own_scheduler_and_optimizer,
    _zero3_gather_on_save,
]


def check_deepspeed(ds: dict, file: str = "DeepSpeed config") -> list[Finding]:
    """Checks of the DeepSpeed JSON on its own."""
    return _run(file, DEEPSPEED_RULES, ds)


# ---------------------------------------------------------------- the DeepSpeed config against the run


def _micro(recipe: dict) -> int:
    return recipe.get("per_device_train_batch_size", 8)


def _accumulation(recipe: dict, dp: int) -> int:
    """The recipe's accumulation on `dp` ranks; ValueError when global_batch_size does not divide."""
    ga, gbs = recipe.get("gradient_accumulation_steps", 1), recipe.get("global_batch_size")
    return resolve_gradient_accumulation(ga, gbs, _micro(recipe), dp)


def check_deepspeed_with_run(
    ds: dict,
    recipe: dict,
    world_size: int,
    file: str = "DeepSpeed config",
    recipe_file: str = "recipe config",
) -> list[Finding]:
    """Checks of the DeepSpeed JSON against the recipe's batch settings and the world size."""
    stages, stage = pipeline_stages(ds, recipe), _zero(ds).get("stage", 0)
    found = []
    if stages > 1 and stage in (2, 3):
        problem = f"ZeRO-{stage} with {stages} pipeline stages: DeepSpeed supports only ZeRO-0/1 "
        problem += "with pipeline parallelism"
        fix = "use stage 1 (or 0) for pipeline runs"
        found += findings(file, [("zero_optimization.stage", problem, fix)])
    if world_size % stages:  # reported where the stages are set: the JSON, else the recipe
        in_json = isinstance((ds.get("pipeline") or {}).get("stages"), int)
        key = "pipeline.stages" if in_json else "pipeline_stages"
        problem = f"{stages} stages do not divide the world size {world_size}"
        fix = f"use a world size that is a multiple of {stages}"
        return found + findings(file if in_json else recipe_file, [(key, problem, fix)])
    dp = world_size // stages
    try:
        ga = _accumulation(recipe, dp)
    except ValueError:  # check_recipe reports it
        ga = None
    batch = _batch_settings(ds, _micro(recipe), ga, dp)
    return found + findings(file, [*batch, *_precisions(ds, recipe, recipe_file)])


def _batch_settings(ds: dict, micro: int, ga: int | None, dp: int) -> Iterator[Problem]:
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    ds_micro, ds_ga, ds_train = (ds.get(k) if isinstance(ds.get(k), int) else None for k in keys)
    if ds_micro is not None and ds_micro != micro:
        problem = f"{ds_micro} differs from the recipe's per_device_train_batch_size {micro}"
        yield "train_micro_batch_size_per_gpu", problem, 'set it to "auto" (the recipe\'s value is used)'
    if ds_ga is not None and ga is not None and ds_ga != ga:
        problem = f"{ds_ga} differs from the recipe's gradient accumulation {ga}; DeepSpeed's wins "
        problem += "and the run no longer matches its plan"
        yield "gradient_accumulation_steps", problem, 'set it to "auto"'
    micro, ga = micro if ds_micro is None else ds_micro, ga if ds_ga is None else ds_ga
    if ds_train is not None and ga is not None and ds_train != micro * ga * dp:
        product = f"{micro} x {ga} x {dp} = {micro * ga * dp}"
        problem = f"{ds_train} is not micro x GA x data-parallel size = {product}"
        yield "train_batch_size", problem, 'set it to "auto"'


def _precisions(ds: dict, recipe: dict, recipe_file: str) -> Iterator[Problem]:
    precision = recipe.get("mixed_precision", "no")
    for name in ("bf16", "fp16"):
        if precision_enabled(ds, name) is True and precision != name:
            problem = f"enabled here, but the recipe's mixed_precision is {precision!r}"
            yield f"{name}.enabled", problem, f'set it to "auto" and mixed_precision: {name} in {recipe_file}'


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
    problems, ga = [], 1
    dp = world_size // pipeline if world_size % pipeline == 0 else world_size
    try:
        ga = _accumulation(recipe, dp) or 1
    except ValueError as err:  # the message the recipe stops with, split into problem and fix
        problem, _, fix = str(err).removeprefix("global_batch_size ").partition("; ")
        problems.append(("global_batch_size", problem, fix))
    steps_per_epoch = None
    if num_samples is not None:
        drop_last = recipe.get("dataloader_drop_last", False)
        batches = batches_before_sharding(num_samples, _micro(recipe), drop_last)
        steps_per_epoch = optimizer_steps_per_epoch(max(1, batches_per_rank(batches, dp)), ga)
    epochs_set = keys_in_file is None or "num_train_epochs" in keys_in_file
    return findings(file, [*problems, *_schedule(recipe, steps_per_epoch, epochs_set)])


def _schedule(recipe: dict, steps_per_epoch: int | None, epochs_set: bool) -> Iterator[Problem]:
    max_steps, warmup = recipe.get("max_steps", -1), recipe.get("warmup_steps", 0)
    total = max_steps if max_steps > 0 else None
    if total is None and steps_per_epoch is not None:
        total = math.ceil(recipe.get("num_train_epochs", 1.0) * steps_per_epoch)
    if total is not None and warmup > total:
        problem = (
            f"{warmup} warmup steps, but training has only {total} steps: the learning rate never decays"
        )
        fix = f"use at most {total} warmup steps (fewer, for the learning rate to decay)"
        yield "warmup_steps", problem, fix
    if recipe.get("warmup_ratio", 0.0) >= 1.0:
        problem = "a warmup ratio of 1 or more makes the whole run warmup"
        yield "warmup_ratio", problem, "use a ratio below 1, e.g. 0.1"
    if max_steps > 0 and epochs_set and steps_per_epoch is not None and max_steps < steps_per_epoch:
        epochs = recipe.get("num_train_epochs")
        problem = f"max_steps {max_steps} ends before one epoch ({steps_per_epoch} steps) while "
        problem += f"num_train_epochs is {epochs}: max_steps wins"
        fix = "remove num_train_epochs to make the choice explicit, or remove max_steps to train whole epochs"
        yield "max_steps", problem, fix


def check_nonfinite(recipe: dict, deepspeed: bool, file: str = "recipe config") -> list[Finding]:
    """on_nonfinite is a known choice, and skip runs only where the recipe itself applies each update.
    The one home of this rule: `recipes doctor` and every recipe's start-up (preflight) run it."""
    return findings(file, _nonfinite(recipe, deepspeed))


def _nonfinite(recipe: dict, deepspeed: bool) -> Iterator[Problem]:
    choice = recipe.get("on_nonfinite", "stop")
    if choice not in ON_NONFINITE_CHOICES:
        problem = f"{choice!r} is not one of {', '.join(ON_NONFINITE_CHOICES)}"
        fix = "use stop (the run stops at a non-finite step) or skip (that step's update is dropped and "
        fix += "training continues)"
        yield "on_nonfinite", problem, fix
    if choice != "skip":
        return
    stop = "use on_nonfinite: stop (the run stops at that step and keeps the last good checkpoint)"
    unseen = "before the recipe sees the loss or the gradient norm"
    if recipe.get("deepspeed_config"):  # the recipe drives the DeepSpeed engine itself (pipeline)
        problem = "skip cannot be honoured by a recipe that drives the DeepSpeed engine itself: its "
        problem += f"train_batch applies the optimizer step {unseen}"
        yield "on_nonfinite", problem, stop
    elif deepspeed:
        problem = "skip cannot be honoured under DeepSpeed: its backward applies the optimizer step "
        problem += f"(engine.step) {unseen}"
        fix = f"{stop}, or launch without DeepSpeed (DDP: accelerate_configs/multi_gpu.yaml)"
        yield "on_nonfinite", problem, fix
    if recipe.get("mixed_precision") == "fp16":
        problem = "skip does not combine with fp16: its loss scaler skips overflowing steps itself and "
        problem += "lowers the scale only on the steps it sees"
        yield "on_nonfinite", problem, "use mixed_precision: bf16 or no, or on_nonfinite: stop"
    limit = recipe.get("max_consecutive_skips", 1)
    if limit < 1:
        problem = f"{limit} would stop the run before any step is skipped"
        fix = "use at least 1 (the run stops after that many skipped steps in a row)"
        yield "max_consecutive_skips", problem, fix


def check_fsdp_with_recipe(acc: dict, recipe: dict, file: str, recipe_file: str) -> list[Finding]:
    """An FSDP accelerate config against the recipe config and its model's layer classes."""
    fsdp = fsdp_rules.normalized(acc.get("fsdp_config"))
    layout = None
    if recipe.get("model_name_or_path"):
        layout = fsdp_rules.model_layout(recipe["model_name_or_path"], recipe.get("trust_remote_code", False))
    model = recipe.get("model_name_or_path", "the model")
    return findings(recipe_file, fsdp_rules.recipe_problems(recipe)) + findings(
        file, fsdp_rules.wrap_problems(fsdp, model, layout)
    )


def check_precision_on_device(precision: str, gpu: str, file: str, key: str) -> list[Finding]:
    device = get_device(gpu)
    if precision not in ("bf16", "fp16") or device.supports(precision):
        return []
    has = " or ".join(p for p in ("bf16", "fp16") if device.supports(p)) or "no"
    problem = f"{precision} is not supported by {device.name}"
    return findings(file, [(key, problem, f"use {has} mixed precision on {device.name}")])


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
    found: list[Finding] = []
    acc = ds = recipe = raw = None
    world_size = 1
    if recipe_config:
        raw, errors = load_config_file(recipe_config)
        found += errors
        if raw is not None:
            if recipe_fields is not None:
                found += findings(recipe_config, unknown_keys(raw, recipe_fields))
            recipe = {**(recipe_defaults or {}), **raw}
    if accelerate_config:
        acc, errors = load_config_file(accelerate_config)
        found += errors
        if acc is not None:
            found += check_accelerate(acc, accelerate_config)
            world_size = acc.get("num_processes", 1) if isinstance(acc.get("num_processes"), int) else 1
            acc_ds = acc.get("deepspeed_config") or {}
            deepspeed_config = deepspeed_config or acc_ds.get("deepspeed_config_file")
            hostfile = hostfile or acc_ds.get("deepspeed_hostfile")
    deepspeed_config = deepspeed_config or (recipe or {}).get("deepspeed_config")
    if deepspeed_config:
        ds, errors = load_config_file(deepspeed_config)
        found += errors
        if ds is not None:
            found += check_deepspeed(ds, deepspeed_config)
            init_flag = ((acc or {}).get("deepspeed_config") or {}).get("zero3_init_flag")
            found += findings(accelerate_config or "accelerate config", zero3_init_problems(ds, init_flag))
    if hostfile and acc is not None:
        try:
            hosts = parse_hostfile(Path(hostfile).read_text())
            num_machines = acc.get("num_machines", 1)
            found += check_hostfile(hosts, world_size, num_machines, hostfile, accelerate_config or "")
        except (OSError, ValueError) as err:
            found += findings(hostfile, [("-", str(err), "write one 'hostname slots=N' per line")])
    if recipe is not None:
        stages = pipeline_stages(ds, recipe)
        found += check_recipe(recipe, world_size, recipe_config, set(raw), num_samples, stages)
        deepspeed = ds is not None or (acc or {}).get("distributed_type") == "DEEPSPEED"
        found += check_nonfinite(recipe, deepspeed, recipe_config)
        if ds is not None:
            found += check_deepspeed_with_run(ds, recipe, world_size, deepspeed_config, recipe_config)
        if (acc or {}).get("distributed_type") == "FSDP":
            found += check_fsdp_with_recipe(acc, recipe, accelerate_config, recipe_config)
    if gpu:
        precision = (recipe or {}).get("mixed_precision", "no")
        recipe_file = recipe_config or "recipe config"
        found += check_precision_on_device(precision, gpu, recipe_file, "mixed_precision")
        for name in ("bf16", "fp16"):
            if ds is not None and precision_enabled(ds, name):
                found += check_precision_on_device(name, gpu, deepspeed_config, f"{name}.enabled")
    return found


def preflight(cfg: Any, world_size: int, env: Mapping[str, str] | None = None) -> None:
    """Run the doctor's checks inside a recipe: the recipe config plus the DeepSpeed config that
    `accelerate launch` names in the environment, or the recipe's own `deepspeed_config` field (the
    pipeline recipe). Raises DoctorError listing every finding."""
    env = os.environ if env is None else env
    recipe = dataclasses.asdict(cfg)
    launched_with_deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launched_with_deepspeed else None
    ds_file = ds_file or recipe.get("deepspeed_config")
    ds, found = load_config_file(ds_file) if ds_file else (None, [])
    if ds is not None:
        found += check_deepspeed(ds, ds_file) + check_deepspeed_with_run(ds, recipe, world_size, ds_file)
    if launched_with_deepspeed and ds_file:
        # Accelerate refuses these next to a config file, with a message that does not name the file.
        from_accelerate = set(filter(None, env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")))
        conflicts = sorted(from_accelerate & (known_keys.DEEPSPEED_FILE_CONFLICTS | {"mixed_precision"}))
        fix = "remove it from the accelerate config"
        found += findings("accelerate config", [(key, REFUSED_NEXT_TO_FILE, fix) for key in conflicts])
        if ds is not None:
            init_flag = env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")
            found += findings("accelerate config", zero3_init_problems(ds, init_flag))
    if fsdp_rules.requested(env):
        # The wrap classes are checked against the loaded model when it is sharded (core/distributed/fsdp.py).
        found += findings("accelerate config", fsdp_rules.settings_problems(fsdp_rules.from_env(env)))
        found += findings("recipe config", fsdp_rules.recipe_problems(recipe))
        if launched_with_deepspeed:
            problem = "FSDP and DeepSpeed both set in the launch environment (ACCELERATE_USE_FSDP and "
            problem += "ACCELERATE_USE_DEEPSPEED)"
            fix = "launch with one accelerate config: an FSDP one or a DeepSpeed one"
            found += findings("accelerate config", [("distributed_type", problem, fix)])
    found = check_recipe(recipe, world_size, pipeline=pipeline_stages(ds, recipe)) + found
    found += check_nonfinite(recipe, deepspeed=launched_with_deepspeed or bool(ds_file))
    if found:
        raise DoctorError(f"{len(found)} config problem(s) found before training:\n{report(found)}")

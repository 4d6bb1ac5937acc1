"""The whole diagnosis: `recipes doctor` loads the given files and runs every check that applies
(`diagnose`); a recipe runs the same checks at start-up on its config and the launch environment
(`preflight`) and stops before anything is loaded, so a bad combination fails in seconds instead of in a
DeepSpeed assertion minutes later."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recipes.core.distributed import fsdp_contract
from recipes.core.distributed.deepspeed_contract import (
    pipeline_stages,
    precision_enabled,
    zero3_init_problems,
)
from recipes.core.doctor import known_keys
from recipes.core.doctor.accelerate_config import (
    REFUSED_NEXT_TO_FILE,
    check_accelerate,
    check_hostfile,
    parse_hostfile,
)
from recipes.core.doctor.deepspeed import check_deepspeed, check_deepspeed_with_run
from recipes.core.doctor.findings import DoctorError, Finding, findings, load_config_file, unknown_keys
from recipes.core.doctor.fsdp import check_fsdp_with_recipe, from_env
from recipes.core.doctor.recipe import check_nonfinite, check_precision_on_device, check_recipe
from recipes.core.doctor.sources import check_sources


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
        found += check_sources(recipe, recipe_config)
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
    if fsdp_contract.requested(env):
        # The wrap classes are checked against the loaded model when it is sharded (core/distributed/fsdp.py).
        found += findings("accelerate config", fsdp_contract.settings_problems(from_env(env)))
        found += findings("recipe config", fsdp_contract.recipe_problems(recipe))
        if launched_with_deepspeed:
            problem = "FSDP and DeepSpeed both set in the launch environment (ACCELERATE_USE_FSDP and "
            problem += "ACCELERATE_USE_DEEPSPEED)"
            fix = "launch with one accelerate config: an FSDP one or a DeepSpeed one"
            found += findings("accelerate config", [("distributed_type", problem, fix)])
    found = check_recipe(recipe, world_size, pipeline=pipeline_stages(ds, recipe)) + found
    found += check_nonfinite(recipe, deepspeed=launched_with_deepspeed or bool(ds_file))
    if found:
        raise DoctorError(found)

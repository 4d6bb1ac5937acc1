"""The doctor's checks of a DeepSpeed config: its keys and offload paths, and the DeepSpeed contract
(core/distributed/deepspeed_contract.py) on its own and against the recipe's values and the world size."""

from __future__ import annotations

from collections.abc import Iterator

from recipes.core.config import Problem
from recipes.core.distributed import deepspeed_contract
from recipes.core.distributed.deepspeed_contract import DeepSpeedRun
from recipes.core.doctor import known_keys
from recipes.core.doctor.findings import Finding, findings, run_rules, unknown_keys


def _zero(ds: dict) -> dict:
    return ds.get("zero_optimization") or {}


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


DEEPSPEED_RULES = [_deepspeed_keys, _offload_nvme_paths, deepspeed_contract.config_problems]


def check_deepspeed(ds: dict, file: str = "DeepSpeed config") -> list[Finding]:
    """Checks of the DeepSpeed JSON on its own."""
    return run_rules(file, DEEPSPEED_RULES, ds)


def check_deepspeed_with_run(
    ds: dict,
    recipe: dict,
    world_size: int,
    file: str = "DeepSpeed config",
    recipe_file: str = "recipe config",
) -> list[Finding]:
    """Checks of the DeepSpeed JSON against the recipe's values and the world size."""
    run = DeepSpeedRun.of(recipe, world_size, ds, recipe_file)
    found = findings(file, deepspeed_contract.run_problems(ds, run))
    if run.data_parallel_size is None:  # reported where the stages are set: the JSON, else the recipe
        in_json = isinstance((ds.get("pipeline") or {}).get("stages"), int)
        key = "pipeline.stages" if in_json else "pipeline_stages"
        problem = f"{run.pipeline_stages} stages do not divide the world size {world_size}"
        fix = f"use a world size that is a multiple of {run.pipeline_stages}"
        found += findings(file if in_json else recipe_file, [(key, problem, fix)])
    return found + findings(recipe_file, deepspeed_contract.recipe_problems(ds, run))

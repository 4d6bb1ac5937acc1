"""The doctor's FSDP checks: the FSDP contract's rules (core/distributed/fsdp_contract.py) as findings, on an
accelerate config's YAML and, at a recipe's start-up, on the environment that `accelerate launch` made from
it (`from_env`), where a key counts as set when it differs from the launcher's default.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from recipes.core.config import Problem
from recipes.core.distributed import fsdp_contract
from recipes.core.doctor import known_keys
from recipes.core.doctor.findings import Finding, findings, unknown_keys

# The environment variable `accelerate launch` sets for each fsdp_config key (accelerate/utils/launch.py).
ENV_NAMES = {
    "fsdp_version": "FSDP_VERSION",
    "fsdp_sharding_strategy": "FSDP_SHARDING_STRATEGY",
    "fsdp_backward_prefetch": "FSDP_BACKWARD_PREFETCH",
    "fsdp_forward_prefetch": "FSDP_FORWARD_PREFETCH",
    "fsdp_use_orig_params": "FSDP_USE_ORIG_PARAMS",
    "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD",
    "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
    "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING",
    "fsdp_activation_checkpointing_offload": "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD",
    "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "fsdp_sync_module_states": "FSDP_SYNC_MODULE_STATES",
    "fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP",
}


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The fsdp_config settings an FSDP launch put in the environment that differ from the launcher's
    defaults (it sets every variable, so a default cannot be told from a value the config wrote), and
    the FSDP version, which it always sets."""
    defaults = known_keys.launch_group("FSDP Arguments")
    found = {}
    for key, name in ENV_NAMES.items():
        if name in env and (
            key == "fsdp_version" or str(env[name]).lower() != str(defaults.get(key)).lower()
        ):
            found[key] = env[name]
    return found


def accelerate_problems(acc: Mapping[str, Any]) -> Iterator[Problem]:
    """FSDP rules of a whole accelerate config: its fsdp_config and parallelism_config keys are known ones,
    then the contract's rules."""
    yield from unknown_keys(
        dict(acc.get("fsdp_config") or {}), known_keys.accelerate_fsdp_keys(), "fsdp_config."
    )
    parallelism = dict(acc.get("parallelism_config") or {})
    yield from unknown_keys(parallelism, known_keys.accelerate_parallelism_keys(), "parallelism_config.")
    yield from fsdp_contract.accelerate_problems(acc)


def check_fsdp_with_recipe(acc: dict, recipe: dict, file: str, recipe_file: str) -> list[Finding]:
    """An FSDP accelerate config against the recipe config and its model's layer classes."""
    fsdp = fsdp_contract.normalized(acc.get("fsdp_config"))
    layout = None
    if recipe.get("model_name_or_path"):
        layout = fsdp_contract.model_layout(
            recipe["model_name_or_path"], recipe.get("trust_remote_code", False)
        )
    model = recipe.get("model_name_or_path", "the model")
    return findings(recipe_file, fsdp_contract.recipe_problems(recipe)) + findings(
        file, fsdp_contract.wrap_problems(fsdp, model, layout)
    )

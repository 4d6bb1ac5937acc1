"""The FSDP contract: what an FSDP launch's settings (an accelerate config's `fsdp_config` and
`parallelism_config`), the recipe config and the model must agree on for FSDP2 to take effect as they say.

The rules yield (key, problem, fix) with the accelerate config's key names. `recipes doctor` runs them on
the YAML and turns them into findings with lines (core/doctor/fsdp.py); a recipe's start-up runs them on the
environment `accelerate launch` made from it (the doctor's preflight), and `prepare` runs the wrap-class
rules on the loaded model (core/distributed/fsdp.py). No torch import but where a model is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from recipes.core.config import Problem
from recipes.core.model.optimizer import BITSANDBYTES_OPTIMIZERS

# FSDP1 settings FSDP2 ignores (Accelerate's plugin reads them only when fsdp_version is 1).
FSDP1_ONLY = {
    "fsdp_sharding_strategy": "FSDP2 ignores it and shards fully; hybrid sharding is parallelism_config's "
    "parallelism_config_dp_replicate_size x parallelism_config_dp_shard_size",
    "fsdp_backward_prefetch": "FSDP2 ignores it (it prefetches the next layer's all-gather itself)",
    "fsdp_forward_prefetch": "FSDP2 ignores it",
    "fsdp_use_orig_params": "FSDP2 ignores it (it always trains the original parameters)",
}


def requested(env: Mapping[str, str]) -> bool:
    """Whether `accelerate launch` started the processes with an FSDP config."""
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _true(value: Any) -> bool:
    return str(value).lower() == "true"


def normalized(fsdp_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsdp_config with every key as `accelerate launch` reads it (with the fsdp_ prefix)."""
    return {k if str(k).startswith("fsdp") else f"fsdp_{k}": v for k, v in (fsdp_config or {}).items()}


def settings_problems(fsdp: Mapping[str, Any]) -> Iterator[Problem]:
    """Rules of an FSDP launch's settings (normalized keys; an absent key has the launcher's default)."""
    version = fsdp.get("fsdp_version")
    if version is None:
        problem = "no fsdp_version, so Accelerate runs FSDP1 (its default); the recipes drive FSDP2 (torch's "
        yield "fsdp_config", problem + "fully_shard) only", "add fsdp_version: 2"
        return
    if str(version) != "2":
        problem = f"FSDP{version}: the recipes drive FSDP2 (torch's fully_shard) only"
        yield "fsdp_config.fsdp_version", problem, "set fsdp_version: 2"
        return
    for key, why in FSDP1_ONLY.items():
        if key in fsdp:
            yield f"fsdp_config.{key}", f"an FSDP1 setting next to fsdp_version: 2: {why}", "remove it"
    reshard = fsdp.get("fsdp_reshard_after_forward")
    if reshard is not None and str(reshard).lower() not in ("true", "false"):
        problem = (
            f"{reshard!r} is FSDP1's form of it; FSDP2 takes true or false (Accelerate refuses the rest)"
        )
        fix = "true: each layer is gathered again for backward (least memory, FULL_SHARD's); false: kept "
        fix += "gathered from its forward to its backward (SHARD_GRAD_OP's)"
        yield "fsdp_config.fsdp_reshard_after_forward", problem, fix
    for key in ("fsdp_activation_checkpointing", "fsdp_activation_checkpointing_offload"):
        if _true(fsdp.get(key)):
            problem = "activation checkpointing is the recipe's gradient_checkpointing field (this config is "
            problem += "topology only, and both would checkpoint every layer twice)"
            yield (
                f"fsdp_config.{key}",
                problem,
                "remove it; set gradient_checkpointing: true in the recipe config",
            )
    if _true(fsdp.get("fsdp_cpu_ram_efficient_loading", "true")) and not _true(
        fsdp.get("fsdp_sync_module_states", "true")
    ):
        problem = "false while fsdp_cpu_ram_efficient_loading is true (also its default): accelerate launch "
        problem += "refuses the combination"
        fix = "set fsdp_sync_module_states: true, or fsdp_cpu_ram_efficient_loading: false"
        yield "fsdp_config.fsdp_sync_module_states", problem, fix


def accelerate_problems(acc: Mapping[str, Any]) -> Iterator[Problem]:
    """FSDP rules of a whole accelerate config (its keys are known ones: the doctor checks that)."""
    raw = acc.get("fsdp_config") or {}
    dist = str(acc.get("distributed_type", "NO"))
    if dist != "FSDP":
        if raw:
            problem = f"ignored: distributed_type is {dist}, so accelerate launch does not use FSDP"
            yield "fsdp_config", problem, "set distributed_type: FSDP, or remove fsdp_config"
        return
    if acc.get("deepspeed_config"):
        problem = "FSDP and DeepSpeed both set: with distributed_type FSDP accelerate launch ignores it"
        fix = "remove deepspeed_config, or launch with a DeepSpeed config (accelerate_configs/ds_zero3.yaml)"
        yield "deepspeed_config", problem, fix
    yield from settings_problems(normalized(raw))
    yield from _hybrid(acc)


def shard_size(acc: Mapping[str, Any], world_size: int) -> int:
    """Processes each parameter is sharded over: parallelism_config's dp_shard_size when the config asks
    for hybrid sharding (replicas of dp_shard_size-way shards), else every process."""
    parallel = acc.get("parallelism_config") or {}
    replicas = int(parallel.get("parallelism_config_dp_replicate_size", 1) or 1)
    return int(parallel.get("parallelism_config_dp_shard_size", world_size // max(replicas, 1)) or 1)


def _hybrid(acc: Mapping[str, Any]) -> Iterator[Problem]:
    parallel = acc.get("parallelism_config") or {}
    if not parallel:
        return
    sizes = {
        k.removeprefix("parallelism_config_").removesuffix("_size"): int(v)
        for k, v in parallel.items()
        if k.endswith("_size") and str(v).isdigit()
    }
    for other in ("tp", "cp", "sp"):
        if sizes.get(other, 1) > 1:
            problem = (
                f"{other} size {sizes[other]}: the recipes shard data-parallel only (FSDP2, hybrid or full)"
            )
            yield f"parallelism_config.parallelism_config_{other}_size", problem, "set it to 1"
    processes = acc.get("num_processes", 1)
    product = sizes.get("dp_replicate", 1) * sizes.get("dp_shard", 1)
    if isinstance(processes, int) and product != processes:
        problem = f"dp_replicate_size x dp_shard_size = {product}, but num_processes is {processes} "
        problem += "(Accelerate refuses a mismatch)"
        fix = "make dp_replicate_size x dp_shard_size equal num_processes (e.g. machines x GPUs per machine)"
        yield "parallelism_config.parallelism_config_dp_shard_size", problem, fix


def recipe_problems(recipe: Mapping[str, Any]) -> Iterator[Problem]:
    """Rules of an FSDP launch against the recipe config."""
    if recipe.get("deepspeed_config"):
        problem = "FSDP and DeepSpeed both set: this recipe drives DeepSpeed's engine itself (pipeline "
        problem += "parallelism), which FSDP cannot shard"
        yield (
            "deepspeed_config",
            problem,
            "launch it with accelerate_configs/pipeline_2proc.yaml (or a DeepSpeed config)",
        )
    precomputed = recipe.get("precompute_ref_log_probs") and not recipe.get("ref_model_name_or_path")
    if "precompute_ref_log_probs" in recipe and not precomputed:  # recipes/dpo.py's config
        problem = "a reference model next to the policy under FSDP: the recipes shard no second model, and "
        problem += "no test covers the disabled adapter under FSDP"
        fix = "set precompute_ref_log_probs: true and no ref_model_name_or_path (the sharded policy computes "
        fix += "the reference before its first step), or launch with DDP or a DeepSpeed ZeRO config"
        yield "precompute_ref_log_probs", problem, fix
    if recipe.get("optim") in BITSANDBYTES_OPTIMIZERS:
        problem = f"{recipe['optim']} under FSDP2: bitsandbytes' optimizers update plain tensors and stop on "
        problem += "FSDP2's sharded parameters (DTensors)"
        fix = "use optim: adamw_torch_fused (FSDP2 already shards AdamW's states over the processes), or launch "
        fix += "with DDP (or one process) to keep 8-bit states"
        yield "optim", problem, fix
    if recipe.get("load_in_8bit"):
        problem = "an 8-bit base under FSDP2: its int8 weights cannot be sharded together with the "
        problem += "floating-point parameters of their layer"
        fix = "use load_in_4bit: true with bnb_4bit_quant_storage: float32 (QLoRA that FSDP2 shards), or launch "
        fix += "with DDP or a DeepSpeed ZeRO config"
        yield "load_in_8bit", problem, fix
    storage = recipe.get("bnb_4bit_quant_storage", "uint8")
    if recipe.get("load_in_4bit") and storage != "float32":
        problem = f"4-bit weights stored as {storage} under FSDP2: only stored in the dtype of the other "
        problem += "parameters (float32: the masters, also under bf16) are they sharded with their layer (as "
        problem += "uint8 they stay whole on every process)"
        yield (
            "bnb_4bit_quant_storage",
            problem,
            "set bnb_4bit_quant_storage: float32 (the same packed values)",
        )
    if recipe.get("torch_compile"):
        problem = (
            "torch_compile under FSDP2 is not supported by the recipes yet (compiled layers would trace "
        )
        problem += "FSDP's hooks, which no test here covers)"
        yield "torch_compile", problem, "set torch_compile: false, or launch without FSDP"


@dataclass(frozen=True)
class ModelLayout:
    """What FSDP2's auto-wrap meets in a model: the class of every module, its `_no_split_modules` (the
    layer classes Accelerate wraps when fsdp_transformer_layer_cls_to_wrap is not set), and the classes
    of the modules that hold its input embeddings (e.g. BertEmbeddings)."""

    classes: frozenset[str]
    layers: tuple[str, ...]
    embedding_holders: frozenset[str]


def layout_of(model: Any) -> ModelLayout:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {
        type(m).__name__
        for m in model.modules()
        if m is not embeddings and any(x is embeddings for x in m.modules())
    }
    holders.discard(type(model).__name__)  # the model itself is always a unit of its own
    return ModelLayout(
        frozenset(type(m).__name__ for m in model.modules()),
        tuple(getattr(model, "_no_split_modules", None) or ()),
        frozenset(holders) if embeddings is not None else frozenset(),
    )


def wrap_problems(fsdp: Mapping[str, Any], model: str, layout: ModelLayout | None) -> Iterator[Problem]:
    """The layer classes a transformer-based auto-wrap would wrap, against the recipe's model (None: its
    config could not be read, nothing to check)."""
    if (
        layout is None
        or fsdp.get("fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP"
    ):
        return
    wrap = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
    names = [n.strip() for n in str(wrap).split(",") if n.strip()] if wrap else list(layout.layers)
    key = "fsdp_config.fsdp_transformer_layer_cls_to_wrap" if wrap else "fsdp_config"
    missing = [name for name in names if name not in layout.classes]
    if missing:
        problem = (
            f"{', '.join(missing)}: no module of {model} has this class, so Accelerate cannot wrap its layers"
        )
        yield key, problem, "set it to the model's decoder layer class (its _no_split_modules), or remove it"
    # Without the key the recipes leave such a class out of the model's own ones (core/distributed/fsdp.py).
    holders = [name for name in names if name in layout.embedding_holders] if wrap else []
    if holders:
        problem = f"{', '.join(holders)} holds the input embeddings, which Accelerate's FSDP2 preparation "
        problem += "shards as a unit of their own: sharding them twice fails"
        others = [name for name in names if name not in holders]
        rest = [name for name in layout.layers if name not in layout.embedding_holders]
        fix = f"set fsdp_transformer_layer_cls_to_wrap: {', '.join(others or rest) or '<the layer class>'}"
        yield key, problem, fix


def model_layout(model_name_or_path: str, trust_remote_code: bool = False) -> ModelLayout | None:
    """The ModelLayout of a model built from its config on the meta device (no weights); None when the
    config cannot be read."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return layout_of(model)

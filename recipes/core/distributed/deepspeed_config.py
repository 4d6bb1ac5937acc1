"""DeepSpeed under Accelerate with the recipe as the single source of batch, accumulation, clipping and precision.

The ds_configs/*.json files say "auto" for every value the recipe knows. Accelerate fills most "auto"
values itself but not from the recipe: clipping silently becomes 1.0, and a number written in the JSON
beats the recipe's gradient accumulation with only a warning. `apply_recipe_values` fills those values
from the recipe before `accelerator.prepare` and refuses a JSON number that disagrees with it, so a run
never trains with settings other than the ones its config.yaml and plan.json record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from recipes.core.config import ConfigError


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed config that contradicts the recipe or cannot do what the recipe needs."""


_MISSING = object()


def apply_recipe_values(
    ds_config: dict[str, Any],
    *,
    config_file: str,
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
    micro_batch_size: int | None,
    world_size: int,
    mixed_precision: str,
) -> None:
    """Fill the recipe's values into `ds_config` (in place) and check everything else against the recipe.

    Call after the Accelerator exists (it has filled precision "auto" from the recipe) and before
    `accelerator.prepare` (which hands the config to DeepSpeed).
    """
    problems: list[str] = []

    def settle(key: str, recipe_value: Any, recipe_field: str) -> None:
        value = _get(ds_config, key)
        if value == "auto" and recipe_value is not None:
            _set(ds_config, key, recipe_value)
        elif value not in ("auto", _MISSING) and recipe_value is not None and value != recipe_value:
            problems.append(
                f'{key} is {value!r} but the recipe\'s {recipe_field} gives {recipe_value!r}; set it to "auto" '
                f"so that the recipe decides"
            )

    # Accelerate inserts gradient_accumulation_steps: 1 when the file has none, so "missing" shows up as 1.
    settle("gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps")
    if max_grad_norm is None and _get(ds_config, "gradient_clipping") == "auto":
        problems.append(
            'gradient_clipping is "auto" but the recipe passed no max_grad_norm to make_accelerator'
        )
    settle("gradient_clipping", max_grad_norm, "max_grad_norm")
    settle("train_micro_batch_size_per_gpu", micro_batch_size, "per_device_train_batch_size")
    if micro_batch_size is not None:
        global_batch = micro_batch_size * gradient_accumulation_steps * world_size
        settle(
            "train_batch_size",
            global_batch,
            "per_device_train_batch_size x gradient_accumulation_steps x processes",
        )
    for dtype in ("bf16", "fp16"):
        enabled = _get(ds_config, f"{dtype}.enabled")
        if enabled == "auto":  # Accelerate fills these from the recipe too; done here for any caller
            _set(ds_config, f"{dtype}.enabled", mixed_precision == dtype)
        elif enabled is not _MISSING and bool(enabled) != (mixed_precision == dtype):
            problems.append(
                f'{dtype}.enabled is {enabled!r} but the recipe\'s mixed_precision is {mixed_precision!r}; set it to "auto"'
            )
    for block in ("scheduler", "optimizer"):
        if block in ds_config:
            problems.append(
                f'remove the "{block}" block: the recipe builds the {block} (and its schedule is what plan.json records)'
            )
    gathers_on_save = _get(ds_config, "zero_optimization.stage3_gather_16bit_weights_on_model_save")
    if _get(ds_config, "zero_optimization.stage") == 3 and gathers_on_save is not True:
        problems.append(
            "zero_optimization.stage3_gather_16bit_weights_on_model_save must be true under ZeRO-3, otherwise "
            "the final save cannot gather a full model"
        )
    if problems:
        raise DeepSpeedConfigError(
            f"DeepSpeed config {config_file} disagrees with the recipe:\n- " + "\n- ".join(problems)
        )


def save_resolved_config(accelerator: Any, output_dir: str | Path) -> None:
    """Write the DeepSpeed config as the engine received it (every "auto" filled) to output_dir/ds_config.json."""
    config = getattr(accelerator, "deepspeed_config", None)
    if config is None or not accelerator.is_main_process:
        return
    path = Path(output_dir) / "ds_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(config), indent=2) + "\n")


def _finite(value: Any) -> Any:
    # Accelerate sets steps_per_print to infinity, which JSON cannot hold.
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _get(config: dict[str, Any], dotted_key: str) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, last = dotted_key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def apply_model_values(ds_config: dict[str, Any], model: Any) -> None:
    """Fill ZeRO-3's "auto" stage3_max_live_parameters and stage3_max_reuse_distance (in place, before
    `accelerator.prepare`) from the parameter count of the model's largest repeated layer: two layers'
    worth may be gathered at once (the one computing and the one prefetched), and a gathered parameter
    stays gathered only if it is used again within one layer's worth of the traced module order.

    DeepSpeed's defaults (1e9 each) keep every parameter of a model under a billion parameters gathered
    from its forward to its backward (measured with memory_census: the whole model on every process at
    the end of the forward), so ZeRO-3 held more than ZeRO-2. With these values a layer is released
    after its forward, a layer recomputed under activation checkpointing stays gathered for its backward,
    and the head stays gathered across the turn from forward to backward. Accelerate does not fill these
    "auto"s; DeepSpeed would silently replace them with its defaults.
    """
    zero = ds_config.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        return
    layer = largest_layer_parameters(model)
    for key, value in (("stage3_max_live_parameters", 2 * layer), ("stage3_max_reuse_distance", layer)):
        if zero.get(key) == "auto":
            zero[key] = value


def largest_layer_parameters(model: Any) -> int:
    """Parameters of the model's largest repeated layer (its `_no_split_modules` classes), counted from
    the full shapes also when ZeRO-3 has partitioned them; the largest module with parameters of its own
    when the model names no layer class."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        layers = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]

    def numel(module: Any) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    return max((numel(m) for m in layers), default=0)

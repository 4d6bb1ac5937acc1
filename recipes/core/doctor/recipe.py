"""The doctor's checks of a recipe config: batch and schedule arithmetic, the optimizer, quantised loading,
what a non-finite step does, and the precision on the accelerator a run targets."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

from recipes.core.config import ON_NONFINITE_CHOICES, ConfigError, Problem
from recipes.core.doctor.findings import Finding, findings
from recipes.core.model import optimizer, quantization
from recipes.core.plan.grpo import plan_for_grpo_config
from recipes.core.plan.hardware import get_device
from recipes.core.plan.steps import (
    batches_before_sharding,
    batches_per_rank,
    optimizer_steps_per_epoch,
    resolve_gradient_accumulation,
)


def _micro(recipe: dict) -> int:
    return recipe.get("per_device_train_batch_size", 8)


def _accumulation(recipe: dict, dp: int) -> int:
    """The recipe's accumulation on `dp` ranks; ValueError when global_batch_size does not divide."""
    ga, gbs = recipe.get("gradient_accumulation_steps", 1), recipe.get("global_batch_size")
    return resolve_gradient_accumulation(ga, gbs, _micro(recipe), dp)


def check_recipe(
    recipe: dict,
    world_size: int,
    file: str = "recipe config",
    keys_in_file: set[str] | None = None,
    num_samples: int | None = None,
    pipeline: int = 1,
) -> list[Finding]:
    """Batch and schedule checks of the resolved recipe values (defaults filled in), and the optimizer and
    quantised loading it asks for."""
    problems, ga = [], 1
    dp = world_size // pipeline if world_size % pipeline == 0 else world_size
    try:
        ga = _accumulation(recipe, dp) or 1
    except ValueError as err:  # the message the recipe stops with, split into problem and fix
        problem, _, fix = str(err).removeprefix("global_batch_size ").partition("; ")
        problems.append(("global_batch_size", problem, fix))
    steps_per_epoch = None
    if num_samples is not None and "num_generations" in recipe:  # GRPO: prompts in groups of completions
        try:
            steps_per_epoch = plan_for_grpo_config(
                SimpleNamespace(**recipe), num_samples, dp, ga
            ).optimizer_steps_per_epoch
        except ConfigError as err:  # the message the recipe stops with, split into problem and fix
            problem, _, fix = str(err).partition("; ")
            problems.append(("num_generations", problem, fix))
    elif num_samples is not None:
        drop_last = recipe.get("dataloader_drop_last", False)
        batches = batches_before_sharding(num_samples, _micro(recipe), drop_last)
        steps_per_epoch = optimizer_steps_per_epoch(max(1, batches_per_rank(batches, dp)), ga)
    epochs_set = keys_in_file is None or "num_train_epochs" in keys_in_file
    problems += [*optimizer.problems(recipe), *quantization.problems(recipe)]
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


def check_precision_on_device(precision: str, gpu: str, file: str, key: str) -> list[Finding]:
    device = get_device(gpu)
    if precision not in ("bf16", "fp16") or device.supports(precision):
        return []
    has = " or ".join(p for p in ("bf16", "fp16") if device.supports(p)) or "no"
    problem = f"{precision} is not supported by {device.name}"
    return findings(file, [(key, problem, f"use {has} mixed precision on {device.name}")])

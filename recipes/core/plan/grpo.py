"""Step arithmetic of learning from rewards (GRPO): prompts, completions, generation batches and optimizer
steps, in TRL's GRPOConfig terms. Pure functions, no torch.

Counting completions, not prompts:
- a micro-batch is `per_device_train_batch_size` completions on each data-parallel rank, and an optimizer
  step accumulates `gradient_accumulation_steps` of them: micro x ranks x GA completions a step (with
  `global_batch_size`, that number is fixed and the accumulation derived, as in the other recipes);
- a generation batch is sampled at once, `num_generations` completions of each of its prompts:
  micro x ranks x `steps_per_generation` completions (default steps_per_generation = GA; or set
  `generation_batch_size` in completions instead);
- each generation batch is trained on `num_iterations` times, so it makes
  steps_per_generation x num_iterations / GA optimizer steps;
- an epoch is every whole generation batch the prompts fill (a last, incomplete one is left out and
  counted), so optimizer steps per epoch = generation batches per epoch x optimizer steps per generation batch.

A prompt's completions (its group) share one advantage baseline, so the layout keeps each group inside one
optimizer step: a generation batch is cut into steps of whole groups (`micro_batch_completions` says which
completions each rank trains in each micro-batch), and settings that would split a group across steps are
refused with values that work, as are fewer than 2 generations and a generation batch that is not a
whole number of groups.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from recipes.core.config import ConfigError
from recipes.core.plan.steps import (
    epochs_to_run,
    gradient_accumulation_for,
    linear_warmup_decay_lr,
    total_optimizer_steps,
    warmup_steps_for,
)


@dataclass(frozen=True)
class GRPOPlan:
    """The numbers a GRPO run is committed to before its first generation (plan.json)."""

    num_prompts: int
    world_size: int
    data_parallel_size: int
    micro_batch_size: int  # completions per rank per micro-batch
    gradient_accumulation_steps: int
    num_generations: int
    steps_per_generation: int
    num_iterations: int
    completions_per_step: int
    prompts_per_step: int
    completions_per_generation_batch: int
    prompts_per_generation_batch: int
    optimizer_steps_per_generation_batch: int
    generation_batches_per_epoch: int
    prompts_per_epoch: int  # used: whole generation batches
    prompts_left_out_per_epoch: int
    completions_per_epoch: int  # generated; each trained num_iterations times
    optimizer_steps_per_epoch: int
    num_epochs: int
    total_optimizer_steps: int
    generation_batches: int  # sampled over the run (the last may be trained on only in part)
    warmup_steps: int
    learning_rate: float
    max_completion_length: int
    max_generated_tokens_per_step: float  # every completion at max_completion_length

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_old_logps(self) -> bool:
        """Whether completions are trained after the weights moved since sampling (more than one pass, or
        more than one optimizer step per generation batch), so the importance ratio needs logp_old."""
        return self.num_iterations > 1 or self.steps_per_generation > self.gradient_accumulation_steps

    def lr_at(self, step: int) -> float:
        return linear_warmup_decay_lr(step, self.learning_rate, self.warmup_steps, self.total_optimizer_steps)

    def summary(self) -> str:
        return (
            f"plan: {self.num_prompts} prompts x {self.num_generations} generations; world size "
            f"{self.world_size} (data-parallel {self.data_parallel_size}), micro batch {self.micro_batch_size} "
            f"completions x GA {self.gradient_accumulation_steps} = {self.completions_per_step} completions "
            f"({self.prompts_per_step} prompts) per optimizer step; generation batch "
            f"{self.completions_per_generation_batch} completions ({self.prompts_per_generation_batch} prompts) "
            f"trained {self.num_iterations}x = {self.optimizer_steps_per_generation_batch} optimizer steps; "
            f"{self.generation_batches_per_epoch} generation batches/epoch -> {self.optimizer_steps_per_epoch} "
            f"steps/epoch ({self.prompts_left_out_per_epoch} prompts left out); {self.total_optimizer_steps} steps "
            f"over {self.num_epochs} epoch(s), warmup {self.warmup_steps}, peak lr {self.learning_rate:g}"
        )


def make_grpo_plan(
    *,
    num_prompts: int,
    world_size: int,
    micro_batch_size: int,
    num_generations: int,
    learning_rate: float,
    gradient_accumulation_steps: int = 1,
    global_batch_size: int | None = None,
    steps_per_generation: int | None = None,
    generation_batch_size: int | None = None,
    num_iterations: int = 1,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    max_completion_length: int = 256,
) -> GRPOPlan:
    """Every derived number of a GRPO run (module docstring); ConfigError, naming values that work, for
    settings the arithmetic cannot follow."""
    for name, value in (
        ("per_device_train_batch_size", micro_batch_size),
        ("world size", world_size),
        ("num_iterations", num_iterations),
        ("max_completion_length", max_completion_length),
    ):
        if value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if num_generations < 2:
        raise ConfigError(
            f"num_generations is {num_generations}: a completion's advantage is its reward against the other "
            "completions of its prompt, so each prompt needs at least 2; set num_generations to 2 or more"
        )
    dp = world_size
    if global_batch_size:
        try:
            gradient_accumulation_steps = gradient_accumulation_for(global_batch_size, micro_batch_size, dp)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    ga = gradient_accumulation_steps
    if ga <= 0:
        raise ConfigError(f"gradient_accumulation_steps must be a positive integer, got {ga}")
    per_micro = micro_batch_size * dp  # completions in one micro-batch over all ranks
    steps_per_generation = _steps_per_generation(steps_per_generation, generation_batch_size, per_micro, ga)
    generation = per_micro * steps_per_generation
    if generation % num_generations:
        raise ConfigError(
            f"a generation batch of per_device_train_batch_size x data-parallel size x steps_per_generation = "
            f"{micro_batch_size} x {dp} x {steps_per_generation} = {generation} completions is not a whole number "
            f"of groups of num_generations {num_generations}; "
            + _what_works(micro_batch_size, dp, steps_per_generation, num_generations, "steps_per_generation")
        )
    per_step = per_micro * ga
    if per_step % num_generations:
        raise ConfigError(
            f"an optimizer step trains per_device_train_batch_size x data-parallel size x "
            f"gradient_accumulation_steps = {micro_batch_size} x {dp} x {ga} = {per_step} completions, not a "
            f"whole number of groups of num_generations {num_generations}: a prompt's completions would be "
            "split across optimizer steps; "
            + _what_works(micro_batch_size, dp, ga, num_generations, "gradient_accumulation_steps")
        )
    prompts_per_generation = generation // num_generations
    batches_per_epoch = num_prompts // prompts_per_generation
    if batches_per_epoch == 0:
        raise ConfigError(
            f"{num_prompts} prompts fill no generation batch of {prompts_per_generation} prompts "
            f"({generation} completions / num_generations {num_generations}); provide at least "
            f"{prompts_per_generation} prompts, or lower per_device_train_batch_size, steps_per_generation "
            "or the number of processes"
        )
    steps_per_batch = steps_per_generation * num_iterations // ga
    steps_per_epoch = batches_per_epoch * steps_per_batch
    try:
        total = total_optimizer_steps(steps_per_epoch, num_train_epochs, max_steps)
        warmup = warmup_steps_for(total, warmup_steps, warmup_ratio)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return GRPOPlan(
        num_prompts=num_prompts,
        world_size=world_size,
        data_parallel_size=dp,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=ga,
        num_generations=num_generations,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        completions_per_step=per_step,
        prompts_per_step=per_step // num_generations,
        completions_per_generation_batch=generation,
        prompts_per_generation_batch=prompts_per_generation,
        optimizer_steps_per_generation_batch=steps_per_batch,
        generation_batches_per_epoch=batches_per_epoch,
        prompts_per_epoch=batches_per_epoch * prompts_per_generation,
        prompts_left_out_per_epoch=num_prompts - batches_per_epoch * prompts_per_generation,
        completions_per_epoch=batches_per_epoch * generation,
        optimizer_steps_per_epoch=steps_per_epoch,
        num_epochs=epochs_to_run(total, steps_per_epoch),
        total_optimizer_steps=total,
        generation_batches=math.ceil(total / steps_per_batch),
        warmup_steps=warmup,
        learning_rate=learning_rate,
        max_completion_length=max_completion_length,
        max_generated_tokens_per_step=generation * max_completion_length / steps_per_batch,
    )


def plan_for_grpo_config(cfg: Any, num_prompts: int, world_size: int, ga: int | None = None) -> GRPOPlan:
    """make_grpo_plan of a GRPO recipe config for `num_prompts` prompts on `world_size` processes; `ga`: the
    accumulation the run resolved (else the config's, or global_batch_size's)."""
    return make_grpo_plan(
        num_prompts=num_prompts,
        world_size=world_size,
        micro_batch_size=cfg.per_device_train_batch_size,
        num_generations=cfg.num_generations,
        learning_rate=cfg.learning_rate,
        gradient_accumulation_steps=ga or cfg.gradient_accumulation_steps,
        global_batch_size=None if ga else cfg.global_batch_size,
        steps_per_generation=cfg.steps_per_generation,
        generation_batch_size=cfg.generation_batch_size,
        num_iterations=cfg.num_iterations,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        warmup_ratio=cfg.warmup_ratio,
        max_completion_length=cfg.max_completion_length,
    )


def _steps_per_generation(
    steps_per_generation: int | None, generation_batch_size: int | None, per_micro: int, ga: int
) -> int:
    """steps_per_generation as given, or from generation_batch_size, or GA; a multiple of GA, so that an
    optimizer step takes its micro-batches from one pass over one generation batch."""
    if steps_per_generation and generation_batch_size:
        raise ConfigError(
            "steps_per_generation and generation_batch_size are both set; set one (generation_batch_size = "
            "per_device_train_batch_size x data-parallel size x steps_per_generation)"
        )
    if generation_batch_size:
        if generation_batch_size % per_micro:
            raise ConfigError(
                f"generation_batch_size {generation_batch_size} is not a multiple of per_device_train_batch_size "
                f"x data-parallel size = {per_micro}; use a multiple of {per_micro * ga} (e.g. {per_micro * ga})"
            )
        steps_per_generation = generation_batch_size // per_micro
        name = "generation_batch_size / (per_device_train_batch_size x data-parallel size)"
    else:
        steps_per_generation = steps_per_generation or ga
        name = "steps_per_generation"
    if steps_per_generation <= 0:
        raise ConfigError(f"steps_per_generation must be a positive integer, got {steps_per_generation}")
    if steps_per_generation % ga:
        below = steps_per_generation // ga * ga
        nearest = " or ".join(str(v) for v in (below, below + ga) if v > 0)
        raise ConfigError(
            f"{name} = {steps_per_generation} is not a multiple of gradient_accumulation_steps {ga}: an "
            f"optimizer step would take micro-batches from two generation batches; use {nearest}"
        )
    return steps_per_generation


def _what_works(micro: int, dp: int, count: int, generations: int, count_name: str) -> str:
    """Values that make micro x dp x count a multiple of `generations`: the smallest multiple of `count`,
    the nearest micro-batch sizes, and num_generations that divide the product."""
    product = micro * dp * count
    scaled = count * generations // math.gcd(product, generations)
    micros = [m for m in range(micro, micro + generations + 1) if (m * dp * count) % generations == 0][:1]
    divisors = [g for g in range(2, product + 1) if product % g == 0 and g != generations]
    options = [f"{count_name} {scaled}"]
    options += [f"per_device_train_batch_size {m}" for m in micros]
    if divisors:
        closest = min(divisors, key=lambda g: (abs(g - generations), g))
        options.append(f"num_generations {closest}")
    return "use " + ", or ".join(options)


def micro_batch_completions(plan: GRPOPlan, rank: int) -> list[list[int]]:
    """For one pass over a generation batch, the completions rank `rank` trains in each of its
    steps_per_generation micro-batches, in order. Completion c of a generation batch is generation
    c % num_generations of its prompt c // num_generations. Step t of the pass holds completions
    [t x per_step, (t + 1) x per_step), whole groups; within it, micro-batch a of rank r holds the
    micro_batch_size completions starting at t x per_step + (a x ranks + r) x micro_batch_size."""
    micro, dp, ga = plan.micro_batch_size, plan.data_parallel_size, plan.gradient_accumulation_steps
    batches = []
    for t in range(plan.steps_per_generation // ga):
        for a in range(ga):
            start = t * plan.completions_per_step + (a * dp + rank) * micro
            batches.append(list(range(start, start + micro)))
    return batches

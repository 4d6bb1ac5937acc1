"""Step, batch and schedule arithmetic: pure functions, no torch or accelerate import.

Everything a run's length depends on is computed here, once, and used by `recipes plan`, by every
recipe before its first step (plan.json), and by the tests that check the run against it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from recipes.core.config import ConfigError


def batches_before_sharding(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches a plain DataLoader yields for one epoch over `num_samples` samples."""
    _require_positive(batch_size=batch_size)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def batches_per_rank(
    num_batches: int,
    num_processes: int,
    *,
    split_batches: bool = False,
    drop_last: bool = False,
    even_batches: bool = True,
    process_index: int = 0,
) -> int:
    """Length of an Accelerate-prepared dataloader on one rank, from the unsharded batch count.

    split_batches cuts every batch into `num_processes` pieces, so each rank sees all batches. Otherwise
    whole batches go round-robin: with drop_last the ranks stop at the last full round; with
    even_batches (Accelerate's default) the last round is completed with samples recycled from the
    start of the epoch; without either, the first `num_batches % num_processes` ranks get one more.
    """
    _require_positive(num_processes=num_processes)
    if split_batches or num_processes == 1:
        return num_batches
    full_rounds, leftover = divmod(num_batches, num_processes)
    if leftover == 0 or drop_last:
        return full_rounds
    if even_batches:
        return full_rounds + 1
    return full_rounds + (1 if process_index < leftover else 0)


def optimizer_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """A partial final accumulation window still ends in an optimizer step of its own."""
    _require_positive(gradient_accumulation_steps=gradient_accumulation_steps)
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def total_optimizer_steps(steps_per_epoch: int, num_train_epochs: float, max_steps: int = -1) -> int:
    """max_steps > 0 overrides num_train_epochs, as in transformers.TrainingArguments."""
    if max_steps > 0:
        return max_steps
    if num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs must be > 0 when max_steps is not set, got {num_train_epochs}")
    return math.ceil(num_train_epochs * steps_per_epoch)


def epochs_to_run(total_steps: int, steps_per_epoch: int) -> int:
    """Passes over the data the loop starts (the last one may stop part-way)."""
    if steps_per_epoch <= 0:
        return 0
    return math.ceil(total_steps / steps_per_epoch)


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """warmup_steps > 0 wins; otherwise ceil(warmup_ratio x total), the transformers Trainer's rule."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def linear_warmup_decay_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR used by 1-based optimizer step `step` under get_linear_schedule_with_warmup.

    The scheduler has been stepped `step - 1` times when step `step` runs, so warmup starts at 0 and
    the peak is reached by step `warmup_steps + 1`. Past the last step the value is 0.
    """
    done = step - 1
    # Same operation order as transformers' lambda times the base LR, so values match bit for bit.
    if done < warmup_steps:
        return peak_lr * (done / max(1, warmup_steps))
    return peak_lr * max(0.0, (total_steps - done) / max(1, total_steps - warmup_steps))


def data_parallel_size(world_size: int, pipeline_stages: int = 1, tensor_parallel_size: int = 1) -> int:
    """Ranks that see different data: the world divided by the model-parallel group size."""
    _require_positive(
        world_size=world_size, pipeline_stages=pipeline_stages, tensor_parallel_size=tensor_parallel_size
    )
    model_parallel = pipeline_stages * tensor_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by pipeline_stages x tensor_parallel_size = "
            f"{pipeline_stages} x {tensor_parallel_size} = {model_parallel}; use a world size that is a "
            f"multiple of {model_parallel}, or change the parallel sizes"
        )
    return world_size // model_parallel


def gradient_accumulation_for(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """The accumulation that turns micro batches on `dp_size` ranks into `global_batch_size` samples."""
    _require_positive(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp_size)
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        below = global_batch_size // per_step * per_step
        nearest = [size for size in (below, below + per_step) if size > 0]
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by per_device_train_batch_size x "
            f"data-parallel size = {micro_batch_size} x {dp_size} = {per_step}; use a multiple of {per_step} "
            f"(nearest: {' or '.join(map(str, nearest))}) or change per_device_train_batch_size"
        )
    return global_batch_size // per_step


def resolve_gradient_accumulation(
    gradient_accumulation_steps: int, global_batch_size: int | None, micro_batch_size: int, dp_size: int
) -> int:
    """A config's accumulation: derived from global_batch_size when that is set, else taken as given.

    Raises ConfigError (gradient_accumulation_for's message, the one a recipe stops with) when
    global_batch_size does not divide.
    """
    if not global_batch_size:
        return gradient_accumulation_steps
    try:
        return gradient_accumulation_for(global_batch_size, micro_batch_size, dp_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class Plan:
    """The numbers a run is committed to before its first step (plan.json)."""

    num_samples: int
    world_size: int
    data_parallel_size: int
    pipeline_stages: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    batches_per_epoch: int
    batches_per_epoch_per_rank: int
    optimizer_steps_per_epoch: int
    num_epochs: int
    total_optimizer_steps: int
    warmup_steps: int
    learning_rate: float
    samples_per_step: int
    tokens_per_sample: float | None
    approx_tokens_per_step: float | None
    approx_total_tokens: float | None
    trainable_parameters: int | None = None  # counted by the recipe (e.g. LoRA adapters only)
    total_parameters: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"plan: {self.num_samples} samples, world size {self.world_size} (data-parallel "
            f"{self.data_parallel_size}), micro batch {self.micro_batch_size} x GA "
            f"{self.gradient_accumulation_steps} = global batch {self.global_batch_size}; "
            f"{self.batches_per_epoch_per_rank} batches/rank/epoch -> {self.optimizer_steps_per_epoch} optimizer "
            f"steps/epoch; {self.total_optimizer_steps} steps over {self.num_epochs} epoch(s), warmup "
            f"{self.warmup_steps}, peak lr {self.learning_rate:g}"
        )

    def lr_at(self, step: int) -> float:
        return linear_warmup_decay_lr(step, self.learning_rate, self.warmup_steps, self.total_optimizer_steps)

    def check_loader_length(self, batches_per_rank_seen: int) -> None:
        """The run's own dataloader must have the length the plan was computed for."""
        if batches_per_rank_seen != self.batches_per_epoch_per_rank:
            raise RuntimeError(
                f"plan expects {self.batches_per_epoch_per_rank} batches per rank, the sharded dataloader has "
                f"{batches_per_rank_seen}: the step arithmetic does not match this Accelerate version"
            )


def make_plan(
    *,
    num_samples: int,
    world_size: int,
    micro_batch_size: int,
    learning_rate: float,
    gradient_accumulation_steps: int = 1,
    global_batch_size: int | None = None,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    pipeline_stages: int = 1,
    tensor_parallel_size: int = 1,
    drop_last: bool = False,
    even_batches: bool = True,
    tokens_per_sample: float | None = None,
    trainable_parameters: int | None = None,
    total_parameters: int | None = None,
) -> Plan:
    """Resolve every derived number of a run from its config, data size and topology.

    With pipeline or tensor parallelism, the data-parallel ranks are the ones the dataloader is
    sharded over; `global_batch_size` (when given) decides gradient accumulation.
    """
    dp = data_parallel_size(world_size, pipeline_stages, tensor_parallel_size)
    if global_batch_size:
        gradient_accumulation_steps = gradient_accumulation_for(global_batch_size, micro_batch_size, dp)
    _require_positive(
        micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps
    )
    batches = batches_before_sharding(num_samples, micro_batch_size, drop_last)
    per_rank = batches_per_rank(batches, dp, drop_last=drop_last, even_batches=even_batches)
    if per_rank == 0:
        raise ValueError(
            f"{num_samples} training samples give no batch on each of {dp} data-parallel ranks at "
            f"per_device_train_batch_size {micro_batch_size}"
            + (" with drop_last" if drop_last else "")
            + f"; provide at least {micro_batch_size * dp} samples or lower the batch size / process count"
        )
    steps_per_epoch = optimizer_steps_per_epoch(per_rank, gradient_accumulation_steps)
    total = total_optimizer_steps(steps_per_epoch, num_train_epochs, max_steps)
    warmup = warmup_steps_for(total, warmup_steps, warmup_ratio)
    samples_per_step = micro_batch_size * gradient_accumulation_steps * dp
    approx_step_tokens = samples_per_step * tokens_per_sample if tokens_per_sample is not None else None
    return Plan(
        num_samples=num_samples,
        world_size=world_size,
        data_parallel_size=dp,
        pipeline_stages=pipeline_stages,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        global_batch_size=samples_per_step,
        batches_per_epoch=batches,
        batches_per_epoch_per_rank=per_rank,
        optimizer_steps_per_epoch=steps_per_epoch,
        num_epochs=epochs_to_run(total, steps_per_epoch),
        total_optimizer_steps=total,
        warmup_steps=warmup,
        learning_rate=learning_rate,
        samples_per_step=samples_per_step,
        tokens_per_sample=tokens_per_sample,
        approx_tokens_per_step=approx_step_tokens,
        approx_total_tokens=approx_step_tokens * total if approx_step_tokens is not None else None,
        trainable_parameters=trainable_parameters,
        total_parameters=total_parameters,
    )


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def plan_for_config(
    cfg: Any,
    *,
    num_samples: int,
    world_size: int,
    gradient_accumulation_steps: int | None = None,
    **extra: Any,
) -> Plan:
    """make_plan from a recipe config's TrainingArguments-style fields.

    `gradient_accumulation_steps` is the value a running recipe already resolved; without it the config's
    own gradient_accumulation_steps / global_batch_size decide, as they will at launch.
    """
    return make_plan(
        num_samples=num_samples,
        world_size=world_size,
        micro_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps or cfg.gradient_accumulation_steps,
        global_batch_size=None if gradient_accumulation_steps else cfg.global_batch_size,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        warmup_ratio=cfg.warmup_ratio,
        learning_rate=cfg.learning_rate,
        drop_last=cfg.dataloader_drop_last,
        **extra,
    )

"""`recipes plan --calibrate K`: time K real optimizer steps here and extrapolate the whole run.

The recipe runs exactly as it would for real (same script, config, launcher and topology), with
max_steps = K + 1, evaluation off and a throwaway output_dir; the first step is warm-up (allocation,
first-call overheads) and is counted once, the other K give the steady time per micro-batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from recipes.core.launch.command import launch_command
from recipes.core.output.records import read_metrics


def window_size(plan: dict, step: int) -> int:
    """Micro-batches in 1-based optimizer step `step` on one rank (the last window of an epoch may be short)."""
    per_epoch, ga, steps_per_epoch = (
        plan["batches_per_epoch_per_rank"],
        plan["gradient_accumulation_steps"],
        plan["optimizer_steps_per_epoch"],
    )
    index = (step - 1) % steps_per_epoch
    return ga if index < steps_per_epoch - 1 else per_epoch - ga * (steps_per_epoch - 1)


def micro_batches_per_rank(plan: dict) -> int:
    """Micro-batches one rank runs over the whole plan."""
    full_epochs, rest = divmod(plan["total_optimizer_steps"], plan["optimizer_steps_per_epoch"])
    return full_epochs * plan["batches_per_epoch_per_rank"] + min(
        rest * plan["gradient_accumulation_steps"], plan["batches_per_epoch_per_rank"]
    )


def extrapolate(step_times: list[float], calibration_plan: dict, plan: dict) -> float:
    """Seconds of step time for all of `plan`: the measured warm-up step once, then the steady time
    per micro-batch for every other micro-batch the plan runs."""
    if len(step_times) < 2:
        raise ValueError("calibration needs at least 2 measured steps (the first one is warm-up)")
    steady_batches = sum(window_size(calibration_plan, s) for s in range(2, len(step_times) + 1))
    per_micro_batch = sum(step_times[1:]) / steady_batches
    remaining = micro_batches_per_rank(plan) - window_size(plan, 1)
    return step_times[0] + per_micro_batch * max(remaining, 0)


def calibrate(
    script: str,
    recipe_config: str,
    overrides: list[str],
    steps: int,
    plan: dict,
    accelerate_config: str | None = None,
    env: dict | None = None,
) -> dict:
    """Run `steps` + 1 optimizer steps of `script` and predict the step time of `plan`."""
    records, calibration_plan = _calibration_run(
        script, recipe_config, overrides, steps, accelerate_config, env
    )
    step_times = [r["step_time"] for r in records]
    seconds = extrapolate(step_times, calibration_plan, plan)
    return {
        "calibration_steps": steps,
        "warmup_step_seconds": step_times[0],
        "seconds_per_step": sum(step_times[1:]) / (len(step_times) - 1),
        "calibrated_wall_clock_seconds": seconds,
        "method": "first step once + mean steady time per micro-batch x remaining micro-batches per rank",
    }


def calibrate_grpo(
    script: str,
    recipe_config: str,
    overrides: list[str],
    steps: int,
    plan: dict,
    accelerate_config: str | None = None,
    env: dict | None = None,
) -> dict:
    """Run `steps` + 1 optimizer steps of the GRPO recipe and predict `plan`'s step time from the measured
    generation time per generation batch and training time per optimizer step (the run's own records)."""
    records, _ = _calibration_run(script, recipe_config, overrides, steps, accelerate_config, env)
    generation = [r["generation_time"] for r in records if r["generation_time"] > 0]
    training = [r["training_time"] for r in records]
    return {
        "calibration_steps": steps,
        "measured_generation_seconds": generation,
        "measured_training_seconds": training,
        **grpo_extrapolation(generation, training, plan["generation_batches"], plan["total_optimizer_steps"]),
        "method": "first generation batch and step once + the mean of the others for every other one",
    }


def grpo_extrapolation(
    generation_times: list[float], training_times: list[float], generation_batches: int, steps: int
) -> dict:
    """Seconds of a GRPO run from measured seconds per generation batch and per optimizer step: the first
    of each (warm-up) once, then the mean of the others (or the first, when it is the only one) for every
    other generation batch and step."""
    if not generation_times or not training_times:
        raise ValueError("calibration needs at least one generation batch and one optimizer step")

    def steady(times: list[float]) -> float:
        return sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]

    per_batch, per_step = steady(generation_times), steady(training_times)
    seconds = (
        generation_times[0]
        + per_batch * max(generation_batches - 1, 0)
        + training_times[0]
        + per_step * max(steps - 1, 0)
    )
    return {
        "calibrated_generation_seconds": per_batch,
        "calibrated_training_seconds": per_step,
        "calibrated_wall_clock_seconds": seconds,
    }


def _calibration_run(
    script: str,
    recipe_config: str,
    overrides: list[str],
    steps: int,
    accelerate_config: str | None,
    env: dict | None,
) -> tuple[list[dict], dict]:
    """The step records (in step order) and plan.json of `steps` + 1 optimizer steps run as for real, with
    evaluation off, in a throwaway output_dir."""
    if steps < 1:
        raise ValueError(f"--calibrate needs at least 1 step to measure after the warm-up step, got {steps}")
    with tempfile.TemporaryDirectory(prefix="calibrate_") as out:
        args = [
            "--config",
            recipe_config,
            *overrides,
            "--max_steps",
            str(steps + 1),
            "--output_dir",
            out,
            "--eval_split",
            "null",
            "--logging_steps",
            "1",
        ]
        cmd = launch_command(script, args, accelerate_config or None)
        result = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"calibration run failed ({' '.join(cmd)}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        records = sorted((r for r in read_metrics(out) if "step_time" in r), key=lambda r: r["step"])
        return records, json.loads((Path(out) / "plan.json").read_text())

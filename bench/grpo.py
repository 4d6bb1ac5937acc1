"""GRPO on the default job (recipes/configs/grpo_smollm2.yaml), the recipe next to TRL's GRPOTrainer on
the same job (bench/trl_grpo.py): seconds per optimizer step, sampling seconds per generation batch,
training seconds per step and generated tokens per second of sampling, each the median over the steps
after the first (warm-up). The two run one after the other on the same machine, so their ratio holds on a
busy one better than either figure.

    python -m bench --sections grpo      # needs trl importable (pip install trl: for the benchmark only)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.job import one_process_config, run, thread_env
from recipes.core.launch.command import free_port, launch_command
from recipes.core.output.records import read_metrics

CONFIG = "recipes/configs/grpo_smollm2.yaml"


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] or values)


def ours(steps: int) -> dict:
    """The recipe for `steps` optimizer steps without evaluation; from its step records."""
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as out:
        args = ["--config", CONFIG, "--max_steps", str(steps), "--eval_split", "null", "--output_dir", out]
        run(launch_command("recipes/grpo.py", args, one_process_config(), 1, port=free_port()), thread_env(1))
        steps_run = [r for r in read_metrics(out) if "loss" in r]
    # Each step here samples its own generation batch (steps_per_generation = GA): its sampling time is its
    # completion tokens / generated_tokens_per_s (generation_time adds scoring and the logp passes).
    sampled = [r for r in steps_run if r["generation_time"] > 0]
    return {
        "step_seconds": _median_after_first([r["step_time"] for r in steps_run]),
        "generation_seconds": _median_after_first(
            [r["completion_tokens"] / r["generated_tokens_per_s"] for r in sampled]
        ),
        "training_seconds": _median_after_first([r["training_time"] for r in steps_run]),
        "generated_tokens_per_second": _median_after_first([r["generated_tokens_per_s"] for r in sampled]),
        "steps": len(steps_run),
    }


def trl_trainer(steps: int) -> dict:
    """TRL's GRPOTrainer on the same job, in a process of its own."""
    with tempfile.TemporaryDirectory(prefix="bench_trl_grpo_") as out:
        result = Path(out) / "trl.json"
        run(
            [sys.executable, "-m", "bench.trl_grpo", "--steps", str(steps), "--out", str(result)],
            thread_env(1),
        )
        found = json.loads(result.read_text())
    per_second = [n / s for n, s in zip(found["generated_tokens"], found["generation_times"], strict=True)]
    return {
        "step_seconds": _median_after_first(found["step_times"]),
        "generation_seconds": _median_after_first(found["generation_times"]),
        # a step samples its generation batch first (steps_per_generation = GA), then scores and trains
        "training_seconds": _median_after_first(
            [
                step - generation
                for step, generation in zip(found["step_times"], found["generation_times"], strict=False)
            ]
        ),
        "generated_tokens_per_second": _median_after_first(per_second),
        "steps": len(found["step_times"]),
    }


def grpo(steps: int) -> dict:
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("the grpo section compares with TRL: pip install trl (the recipes do not need it)")
    import trl

    recipe, theirs = ours(steps), trl_trainer(steps)
    return {
        "config": CONFIG,
        "trl_version": trl.__version__,
        "recipe": recipe,
        "trl": theirs,
        "trl_step_seconds_over_recipe": theirs["step_seconds"] / recipe["step_seconds"],
        "trl_generation_seconds_over_recipe": theirs["generation_seconds"] / recipe["generation_seconds"],
    }

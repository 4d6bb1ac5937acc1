"""TRL's GRPOTrainer on the default GRPO job, for bench/grpo.py: the same model, prompts, reward functions
and weights, batch, generations, completion length, sampling, objective and schedule as
recipes/configs/grpo_smollm2.yaml; writes each optimizer step's time and each generation's time as JSON.

    python -m bench.trl_grpo --steps 4 --out /tmp/trl_grpo.json     # needs trl importable
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "recipes/configs/grpo_smollm2.yaml"


def reward_functions(names: list[str]) -> list:
    import importlib

    return [getattr(importlib.import_module(name.split(":")[0]), name.split(":")[1]) for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trl_grpo", description=__doc__)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ours = yaml.safe_load(CONFIG.read_text())
    model_path = str(REPO / ours["model_name_or_path"])
    train = datasets.load_dataset(
        "json", data_files=str(REPO / ours["dataset_name"] / "train.jsonl"), split="train"
    )
    step_times: list[float] = []
    generation_times: list[float] = []
    generated_tokens: list[int] = []

    class Timed(GRPOTrainer):
        """GRPOTrainer with each generation (sampling, no scoring) timed."""

        def _generate(self, prompts: list):
            started = time.perf_counter()
            result = super()._generate(prompts)
            generation_times.append(time.perf_counter() - started)
            completion_ids = result[1]  # prompt ids, completion ids, ...
            generated_tokens.append(sum(len(ids) for ids in completion_ids))
            return result

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            # TRL turns activation checkpointing on by default; the recipe's job runs without it
            gradient_checkpointing=ours.get("gradient_checkpointing", False),
            per_device_train_batch_size=ours["per_device_train_batch_size"],
            gradient_accumulation_steps=ours["gradient_accumulation_steps"],
            num_generations=ours["num_generations"],
            max_completion_length=ours["max_completion_length"],
            temperature=ours["temperature"],
            num_iterations=ours["num_iterations"],
            beta=ours["beta"],
            epsilon=ours["epsilon"],
            loss_type=ours["loss_type"],
            scale_rewards=ours["scale_rewards"],
            reward_weights=ours["reward_weights"],
            learning_rate=ours["learning_rate"],
            warmup_steps=ours["warmup_ratio"],  # a float in [0, 1): a ratio of the steps
            max_grad_norm=ours["max_grad_norm"],
            lr_scheduler_type="linear",
            max_steps=args.steps,
            seed=ours["seed"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
        )
        trainer = Timed(
            model=AutoModelForCausalLM.from_pretrained(model_path, dtype="float32"),
            processing_class=AutoTokenizer.from_pretrained(model_path),
            reward_funcs=reward_functions(ours["reward_funcs"]),
            args=config,
            train_dataset=train,
            callbacks=[StepClock()],
        )
        trainer.train()
    Path(args.out).write_text(
        json.dumps(
            {
                "step_times": step_times,
                "generation_times": generation_times,
                "generated_tokens": generated_tokens,
                "completions_per_step": ours["per_device_train_batch_size"]
                * ours["gradient_accumulation_steps"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

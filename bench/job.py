"""The benchmark job (one SFT fine-tuning) and running it through the SFT recipe.

Every runner (the recipe, a bare PyTorch loop, the transformers Trainer) gets the same job: the same
model, tokenised samples, sample order, micro-batch, accumulation, schedule and precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from recipes.core.launch.command import free_port, launch_command
from recipes.core.output.records import read_metrics

REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclasses.dataclass
class Job:
    model: str = ".cache/models/SmolLM2-135M-Instruct"
    dataset: str = "recipes/data/sft_instructions"
    samples: int = 48
    micro_batch: int = 4
    gradient_accumulation: int = 2
    max_seq_length: int = 256
    mixed_precision: str = "no"
    packing: bool = False
    use_peft: bool = False
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    seed: int = 42
    loss_chunk_tokens: int = 256
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    pad_to_multiple_of: int | None = None
    load_in_4bit: bool = False
    optim: str = "adamw_torch_fused"

    def recipe_args(self, output_dir: str | Path) -> list[str]:
        """Overrides of the default SFT config that make the recipe run exactly this job."""
        values = {
            "model_name_or_path": self.model,
            "dataset_name": self.dataset,
            "max_train_samples": self.samples,
            "per_device_train_batch_size": self.micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation,
            "max_seq_length": self.max_seq_length,
            "mixed_precision": self.mixed_precision,
            "packing": str(self.packing).lower(),
            "use_peft": str(self.use_peft).lower(),
            "learning_rate": self.learning_rate,
            "warmup_ratio": self.warmup_ratio,
            "seed": self.seed,
            "loss_chunk_tokens": self.loss_chunk_tokens,
            "gradient_checkpointing": str(self.gradient_checkpointing).lower(),
            "torch_compile": str(self.torch_compile).lower(),
            "pad_to_multiple_of": "null" if self.pad_to_multiple_of is None else self.pad_to_multiple_of,
            "load_in_4bit": str(self.load_in_4bit).lower(),
            "optim": self.optim,
            "num_train_epochs": 1,
            "max_steps": -1,
            "eval_split": "null",
            "logging_steps": 1,
            "save_steps": 0,
            "report_to": "none",
            "output_dir": str(output_dir),
        }
        args = ["--config", "recipes/configs/sft_smollm2.yaml"]
        for key, value in values.items():
            args += [f"--{key}", str(value)]
        return args

    def replace(self, **changes) -> Job:
        return dataclasses.replace(self, **changes)


def sample_order(num_samples: int, seed: int, epoch: int = 0) -> list[int]:
    """The order the recipe's seedable sampler draws samples in on one process: a permutation from a
    generator seeded with seed + epoch."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def thread_env(processes: int) -> dict[str, str]:
    """Every run gets the machine's cores split evenly between its processes, the same for all runners."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run(cmd: list[str], env: dict[str, str], timeout: float = 7200) -> None:
    result = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **OFFLINE, **env}, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )


def one_process_config() -> str:
    return (
        "accelerate_configs/single_gpu.yaml" if torch.cuda.is_available() else "accelerate_configs/cpu.yaml"
    )


def run_recipe(
    job: Job,
    accelerate_config: str | None = None,
    processes: int = 1,
    script: str = "recipes/sft.py",
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict:
    """Run the SFT recipe (or `script`, with `extra` arguments, in `env` on top of the usual) on the job
    through `accelerate launch`; what its metrics.jsonl says it did."""
    accelerate_config = accelerate_config or one_process_config()
    with tempfile.TemporaryDirectory(prefix="bench_recipe_") as out:
        args = [*job.recipe_args(out), *extra]
        cmd = launch_command(script, args, accelerate_config, processes, port=free_port())
        run(cmd, {**thread_env(processes), **(env or {})})
        records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    [end] = [r for r in records if "train_runtime" in r]
    return {
        "runner": "recipe",
        "steps": len(steps),
        "step_tokens": [r["tokens"] for r in steps],
        "step_losses": [r["loss"] for r in steps],
        "step_times": [r["step_time"] for r in steps],
        "target_tokens": sum(r["tokens"] for r in steps),
        "runtime": end["train_runtime"],
        "peak_memory_mib_per_process": end["peak_memory_mib_per_process"],
        "setup_peak_memory_mib_per_process": end["setup_peak_memory_mib_per_process"],
        "memory_census": end.get("memory_census"),  # with --memory_census true
    }


def run_baseline(kind: str, job: Job) -> dict:
    """Run bench/baselines.py's `kind` runner (bare | trainer) on the job in a fresh process."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{kind}_") as out:
        result = Path(out) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.baselines",
            kind,
            "--job",
            json.dumps(dataclasses.asdict(job)),
            "--out",
            str(result),
        ]
        run(cmd, thread_env(1))
        return json.loads(result.read_text())

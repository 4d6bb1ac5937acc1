"""The benchmark's measurements, one function per section of the results file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.job import (
    OFFLINE,
    REPO,
    Job,
    one_process_config,
    run,
    run_baseline,
    run_recipe,
    sample_order,
    thread_env,
)
from bench.measures import (
    batches_of,
    long_tailed_lengths,
    median_ratio,
    mfu,
    model_flops_per_second,
    real_token_fraction,
    throughput,
)
from recipes.core.model.shape import model_shape
from recipes.core.plan.flops import FLOPS_FORMULA
from recipes.core.plan.hardware import get_device


def check_same_job(recipe: dict, other: dict, tolerance: float) -> None:
    """The runners must have trained the same job: same steps and tokens, and the same loss per step."""
    if (other["steps"], other["target_tokens"]) != (recipe["steps"], recipe["target_tokens"]):
        raise RuntimeError(f"{other['runner']} ran a different job: {other} vs {recipe}")
    for step, (a, b) in enumerate(zip(recipe["step_losses"], other["step_losses"], strict=True), start=1):
        if abs(a - b) > tolerance * max(1.0, abs(a)):
            raise RuntimeError(f"step {step}: {other['runner']} loss {b} vs recipe {a}: not the same job")


def throughput_comparison(job: Job, repeats: int, with_lora: bool) -> dict:
    """Recipe (padded and packed), bare loop and Trainer, each repetition run side by side, in a
    rotating order so that no runner always goes first on a warming or busy machine."""
    runners = {
        "recipe": lambda: run_recipe(job),
        "recipe_packed": lambda: run_recipe(job.replace(packing=True)),
        "bare": lambda: run_baseline("bare", job),
        "trainer": lambda: run_baseline("trainer", job),
    }
    if with_lora:
        runners["recipe_lora"] = lambda: run_recipe(job.replace(use_peft=True))
    results: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            print(f"  repetition {rep + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
            results[name].append(runners[name]())
        check_same_job(results["recipe"][-1], results["bare"][-1], 1e-5)
        check_same_job(results["recipe"][-1], results["recipe_packed"][-1], 1e-4)
        check_same_job(results["recipe"][-1], results["trainer"][-1], 1e-3)  # the Trainer logs 4 digits
    out = {
        "tokens_per_second": {
            name: statistics.median(throughput(r) for r in runs) for name, runs in results.items()
        },
        "loop_overhead": median_ratio(results["recipe"], results["bare"]),
        "vs_trainer": median_ratio(results["recipe"], results["trainer"]),
        "vs_trainer_packing": median_ratio(results["recipe_packed"], results["trainer"]),
        "packing_speedup": median_ratio(results["recipe_packed"], results["recipe"]),
        "steps": results["recipe"][0]["steps"],
        "target_tokens": results["recipe"][0]["target_tokens"],
        "runs": results,
    }
    if with_lora:
        out["lora"] = {
            "speedup": median_ratio(results["recipe_lora"], results["recipe"]),
            "peak_memory_mib": {
                name: statistics.median(r["peak_memory_mib_per_process"][0] for r in results[name])
                for name in ("recipe", "recipe_lora")
            },
        }
    return out


def padding_waste(job: Job, micro_batch: int) -> dict:
    """Real-token fraction of one epoch, padded and packed, on the job's data and on long-tailed lengths."""
    from bench.baselines import job_setup

    with tempfile.TemporaryDirectory() as out:
        _, _, train_set, _ = job_setup(job.replace(samples=100_000), out)  # the whole bundled split
    bundled = [len(ids) for ids in train_set["input_ids"]]
    tailed = long_tailed_lengths(4000, median=120, sigma=1.0, cap=2048)
    out = {}
    for name, lengths in (("bundled_sft", bundled), ("long_tailed", tailed)):
        batches = batches_of(sample_order(len(lengths), job.seed), micro_batch)
        out[name] = {
            "samples": len(lengths),
            "mean_length": statistics.mean(lengths),
            "max_length": max(lengths),
            "padded": real_token_fraction(lengths, batches, packing=False),
            "packed": real_token_fraction(lengths, batches, packing=True),
        }
    out["micro_batch"] = micro_batch
    out["long_tailed_distribution"] = "log-normal, median 120 tokens, sigma 1.0, cut at 2048, 4000 samples"
    return out


def plan_accuracy(job: Job, calibration_steps: int, measured: list[dict]) -> dict:
    """`recipes plan --calibrate K` against the full runs of the same job: its prediction of the summed
    step time, and the measured sums (median of the runs)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "recipes.cli",
            "plan",
            *job.recipe_args(out),
            "--accelerate-config",
            one_process_config(),
            "--calibrate",
            str(calibration_steps),
            "--json",
        ]
        result = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **OFFLINE, **thread_env(1)},
            capture_output=True,
            text=True,
            check=True,
        )
    predicted = json.loads(result.stdout)["estimate"]["calibrated_wall_clock_seconds"]
    step_sums = [sum(r["step_times"]) for r in measured]
    actual = statistics.median(step_sums)
    return {
        "calibration_steps": calibration_steps,
        "predicted_step_seconds": predicted,
        "measured_step_seconds": actual,
        "error": predicted / actual - 1,
        "measured_runs": len(measured),
    }


def scale_topologies() -> dict[str, tuple[str, int]]:
    """name: (accelerate config, processes); the same configs drive CPU processes and GPUs."""
    two = "multi_gpu.yaml" if torch.cuda.is_available() else "cpu_2proc.yaml"
    return {
        "1 process": (one_process_config(), 1),
        "DDP x2": (f"accelerate_configs/{two}", 2),
        "ZeRO-2 x2": ("accelerate_configs/ds_zero2.yaml", 2),
        "ZeRO-3 x2": ("accelerate_configs/ds_zero3.yaml", 2),
        "FSDP2 x2": ("accelerate_configs/fsdp2.yaml", 2),
    }


def planned_memory(job: Job, accelerate_config: str, processes: int | None = None) -> dict:
    """`recipes plan`'s per-device memory estimate of the job on a topology (bytes: parameters, gradients,
    optimizer_states, activations, offloaded, total), on `processes` instead of the config's count."""
    with tempfile.TemporaryDirectory() as out:
        if processes is not None:
            text = Path(accelerate_config).read_text()
            resized = re.sub(r"(?m)^num_processes:\s*\d+", f"num_processes: {processes}", text)
            accelerate_config = str(Path(out) / "accelerate.yaml")
            Path(accelerate_config).write_text(resized)
        cmd = [sys.executable, "-m", "recipes.cli", "plan", *job.recipe_args(out)]
        cmd += ["--accelerate-config", accelerate_config, "--json"]
        result = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True, check=True
        )
    return json.loads(result.stdout)["estimate"]["memory_per_device"]


def planned_memory_gib(job: Job, accelerate_config: str) -> float:
    """`recipes plan`'s per-device memory estimate (model states + activations) of the job on a topology."""
    return planned_memory(job, accelerate_config)["total"] / 2**30


def scale_model(directory: Path, tokenizer_from: str, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama big enough that weights, gradients and Adam states dominate memory."""
    if (directory / "model.safetensors").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = AutoConfig.from_pretrained(tokenizer_from)
    config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
            "head_dim": 64,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def scale(job: Job, model: Path, steps: int) -> dict:
    """Wall clock and peak memory per process of the same per-process work on 1 and 2 processes (DDP,
    ZeRO-2, ZeRO-3, FSDP2), next to `recipes plan`'s per-device memory estimate of each."""
    shape = model_shape(str(model))
    out = {"model_parameters": shape.total_params, "steps": steps, "topologies": {}}
    for name, (config, processes) in scale_topologies().items():
        print(f"  scale: {name}", file=sys.stderr, flush=True)
        scaled = job.replace(
            model=str(model), samples=steps * processes * job.micro_batch, gradient_accumulation=1
        )
        result = run_recipe(scaled, config, processes)
        out["topologies"][name] = {
            "processes": processes,
            "peak_memory_mib_per_process": result["peak_memory_mib_per_process"],
            "seconds_per_step": statistics.median(result["step_times"][1:] or result["step_times"]),
            "runtime": result["runtime"],
            "planned_memory_gib_per_device": planned_memory_gib(scaled, config),
        }
    return out


# glibc keeps freed buffers resident (each gather, reduce and optimizer temporary), so on CPU processes the
# resident set grows past live memory; with a fixed mmap threshold every buffer of 1 MiB or more goes back
# to the system when freed. Measured on ZeRO-3 x2 (204M parameters): peak 4.6 -> 3.3 GiB per process, at
# about 1.5x the step time. Without it, ZeRO-3 x4 of the 0.5B model did not fit 4 processes into 24 GiB.
RESIDENT_LIVE = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def zero_topologies() -> list[tuple[str, str, int]]:
    """(name, accelerate config, processes) of the ZeRO memory section, from DDP to ZeRO-3 with offload
    (4 processes for ZeRO-3 only: the others would not fit a 0.5B model four times into 24 GiB)."""
    ddp = "multi_gpu.yaml" if torch.cuda.is_available() else "cpu_2proc.yaml"
    rows = [("DDP", ddp, 2), ("ZeRO-1", "ds_zero1.yaml", 2), ("ZeRO-2", "ds_zero2.yaml", 2)]
    rows += [("ZeRO-3", "ds_zero3.yaml", 2), ("ZeRO-3", "ds_zero3.yaml", 4)]
    rows += [("ZeRO-2 offload", "ds_zero2_offload.yaml", 2), ("ZeRO-3 offload", "ds_zero3_offload.yaml", 2)]
    return [(f"{name} x{n}", f"accelerate_configs/{config}", n) for name, config, n in rows]


def zero_memory(job: Job, model: Path, steps: int) -> dict:
    """Model-state bytes per process counted from the tensors (the recipe's memory_census) on each topology
    of zero_topologies, next to `recipes plan`'s estimate of the same run, and the peak resident set.

    Measured model states are the census's largest over its four points (loop start, end of a forward,
    end of its backward, after the step); the plan's are its parameters + gradients + optimizer states
    per device. Offloaded states live in the same address space as the rest on CPU processes; the census
    tells them apart by what holds them: the fp32 master weights and optimizer states (offload_optimizer)
    and the parameter partitions (offload_param) are what DeepSpeed keeps in host memory, so they are
    compared with the plan's host part, and the rest with its device part. The runs set RESIDENT_LIVE."""
    from recipes.core.doctor.topology import read_topology

    shape = model_shape(str(model))
    out = {"model_parameters": shape.total_params, "steps": steps, "topologies": {}}
    for name, config, processes in zero_topologies():
        print(f"  zero: {name}", file=sys.stderr, flush=True)
        scaled = job.replace(
            model=str(model), samples=steps * processes * job.micro_batch, gradient_accumulation=1
        )
        result = run_recipe(scaled, config, processes, extra=("--memory_census", "true"), env=RESIDENT_LIVE)
        census = result["memory_census"]
        planned = planned_memory(scaled, config, processes)
        topology = read_topology(config)
        host = ["master_weights", "optimizer_states"] if topology.offload_optimizer else []
        host += ["parameters"] if topology.offload_param else []
        measured, measured_host = [], []
        for rank in range(processes):
            peak_point = max(census, key=lambda p, r=rank: census[p]["model_states"][r])
            measured.append(census[peak_point]["model_states"][rank])
            measured_host.append(sum(census[peak_point][c][rank] for c in host))
        planned_device = sum(planned[k] for k in ("parameters", "gradients", "optimizer_states"))
        planned_states = planned_device + planned["offloaded"]
        out["topologies"][name] = {
            "processes": processes,
            "census": census,
            "model_state_bytes_per_process": measured,
            "host_side_bytes_per_process": measured_host if host else None,
            "planned_model_state_bytes": planned_states,
            "planned_offloaded_bytes": planned["offloaded"],
            "plan_over_measured": planned_states / max(measured),
            "planned_memory": planned,
            "peak_memory_mib_per_process": result["peak_memory_mib_per_process"],
            "setup_peak_memory_mib_per_process": result["setup_peak_memory_mib_per_process"],
            "seconds_per_step": statistics.median(result["step_times"][1:] or result["step_times"]),
        }
    return out


def pipeline_memory(job: Job, model: Path, steps: int, stage_counts: tuple[int, ...] = (2, 4)) -> dict:
    """Peak memory per process of the same job on one process (recipes/sft.py) and split into pipeline
    stages, one process each: while loading (the setup peak) and during the loop."""
    shape = model_shape(str(model))
    job = job.replace(model=str(model), samples=steps * job.micro_batch * job.gradient_accumulation)
    runs = {"sft.py, 1 process": run_recipe(job)}
    for stages in stage_counts:
        print(f"  pipeline: {stages} stages", file=sys.stderr, flush=True)
        runs[f"{stages} stages"] = run_recipe(
            job,
            "accelerate_configs/pipeline_2proc.yaml",
            stages,
            "recipes/sft_pipeline.py",
            ("--pipeline_stages", str(stages)),
        )
    out = {"model_parameters": shape.total_params, "layers": shape.num_layers, "steps": steps, "runs": {}}
    for name, result in runs.items():
        out["runs"][name] = {
            "processes": len(result["peak_memory_mib_per_process"]),
            "setup_peak_mib_per_process": result["setup_peak_memory_mib_per_process"],
            "loop_peak_mib_per_process": result["peak_memory_mib_per_process"],
        }
    return out


def tokenization(job: Job, copies: int) -> dict:
    """Load + tokenise `copies` copies of the bundled train split with an empty datasets cache, then again
    with the cache the first run left."""
    train = (REPO / job.dataset / "train.jsonl").read_text()
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "train.jsonl").write_text(train * copies)
        (data / "validation.jsonl").write_text(train.splitlines()[0] + "\n")
        big = job.replace(dataset=str(data), samples=10**9)
        env = {"HF_DATASETS_CACHE": str(Path(tmp) / "cache")}
        times = {}
        for name in ("cold", "cached"):
            started = time.perf_counter()
            result = _tokenize_run(big, env)
            times[name] = {"seconds": result["seconds"], "process_seconds": time.perf_counter() - started}
        shutil.rmtree(Path(tmp) / "cache")
    samples = result["samples"]
    return {
        "samples": samples,
        "cold_seconds": times["cold"]["seconds"],
        "cached_seconds": times["cached"]["seconds"],
        "samples_per_second_cold": samples / times["cold"]["seconds"],
        "seconds_saved_by_cache": times["cold"]["seconds"] - times["cached"]["seconds"],
    }


def _tokenize_run(job: Job, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.baselines",
            "tokenize",
            "--job",
            json.dumps(dataclasses.asdict(job)),
            "--out",
            str(result),
        ]
        run(cmd, {**thread_env(1), **env})
        return json.loads(result.read_text())


def model_flops(job: Job, comparison: dict, device_name: str | None) -> dict:
    """Model FLOP/s of the recipe's runs (padded and packed) and, with a known device, MFU."""
    from bench.baselines import job_setup

    with tempfile.TemporaryDirectory() as out:
        _, _, train_set, _ = job_setup(job, out)
    lengths = [len(ids) for ids in train_set["input_ids"]]
    shape = model_shape(job.model)
    precision = {"no": "fp32"}.get(job.mixed_precision, job.mixed_precision)
    peak = get_device(device_name).peak_flops.get(precision) if device_name else None
    out = {"formula": FLOPS_FORMULA + " (tokens: real, non-pad tokens)", "device": device_name}
    for name in ("recipe", "recipe_packed"):
        seconds = statistics.median(r["runtime"] for r in comparison["runs"][name])
        flops_per_s = model_flops_per_second(shape, sum(lengths), statistics.mean(lengths), seconds)
        out[name] = {
            "real_tokens_per_second": sum(lengths) / seconds,
            "model_tflops_per_second": flops_per_s / 1e12,
            "mfu": mfu(flops_per_s, peak) if peak else None,
        }
    return out

"""The GPU check: bf16 exactness of the levers and of FSDP2 (fsdp2.yaml on every GPU) on CUDA, then
throughput, MFU and peak memory of 0.5B- and 1.5B-shaped models with every lever on, the QLoRA rows
(bench/qlora.py) and a GRPO row (sampling and step time) on the 0.5B shape. Started by
bench/gpu_check.sh (which installs what is missing from wheels carried next to it); `--dry-run` runs the
same steps on tiny shapes on the CPU.

    python -m bench.gpu_check --out bench/results/h200.json
    python -m bench.gpu_check --dry-run --out /tmp/gpu_check_dry.json

Exactness here is bf16's: each check compares two ways of computing the same thing in bf16 on the GPU (a
lever against the run without it) and holds the per-step losses to 1% (bf16 keeps 8 significant bits,
2^-9 relative rounding per operation, and GPU kernels add in orders of their own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.levers import QWEN_05B, long_conversations

REPO = Path(__file__).resolve().parent.parent
QWEN_15B = {
    **QWEN_05B,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
}
TINY = {
    **QWEN_05B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 49152,  # the chat tokenizer's
}
BF16_REL = 1e-2


def build_model(directory: Path, shape: dict, tokenizer_from: str) -> Path:
    """A random model of `shape` with the default model's chat tokenizer, saved as a model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    spec = dict(shape)
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train(model: Path, data: Path, out: Path, *fields: str) -> list[dict]:
    """The SFT recipe in this process (one GPU, or the CPU in a dry run); its metrics records."""
    from accelerate.state import AcceleratorState, GradientState

    from recipes.core.output.records import read_metrics
    from recipes.sft import main

    args = [
        "--config",
        "recipes/configs/sft_smollm2.yaml",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--eval_split",
        "null",
        "--report_to",
        "none",
        "--mixed_precision",
        "bf16",
        "--save_steps",
        "0",
        "--warmup_steps",
        "0",
        *fields,
    ]
    try:
        main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return read_metrics(out)


def compare(ours: list[dict], theirs: list[dict], rel: float) -> dict:
    """Largest relative difference of the per-step losses, and whether it is within `rel`."""
    a, b = [r for r in ours if "loss" in r], [r for r in theirs if "loss" in r]
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return {"passed": False, "reason": "different steps"}
    worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b, strict=True))
    return {"max_relative_loss_difference": worst, "tolerance": rel, "passed": worst <= rel}


def exactness(model: Path, data: Path, work: Path, seq_len: int) -> dict:
    """Each lever against the run without it, in bf16 on this device; FSDP2 against the unsharded run."""
    base = [
        "--max_seq_length",
        str(seq_len),
        "--max_train_samples",
        "16",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "4",
        "--learning_rate",
        "1e-4",
    ]
    runs = {
        "reference": [*base, "--loss_chunk_tokens", "0"],
        "chunked_loss": [*base, "--loss_chunk_tokens", "64"],
        "gradient_checkpointing": [*base, "--loss_chunk_tokens", "0", "--gradient_checkpointing", "true"],
        "packing": [*base, "--loss_chunk_tokens", "0", "--packing", "true"],
        "one_big_batch": [
            *base,
            "--loss_chunk_tokens",
            "0",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "1",
        ],
    }
    records = {name: train(model, data, work / name, *fields) for name, fields in runs.items()}
    checks = {
        name: compare(records[name], records["reference"], BF16_REL) for name in runs if name != "reference"
    }
    print("[gpu_check] fsdp2", file=sys.stderr, flush=True)
    checks["fsdp2"] = fsdp2(model, data, work / "fsdp2", records["reference"])
    return checks


def fsdp2(model: Path, data: Path, work: Path, reference: list[dict]) -> dict:
    """accelerate_configs/fsdp2.yaml on every GPU of the machine (Accelerate's own FSDP2 preparation on
    CUDA; in a dry run 2 CPU processes), in bf16, against `reference`, the unsharded one-process run of the
    same batches (exactness()'s); then the run resumed from its checkpoint after step 1, whose final weights
    must equal the uninterrupted run's to 1% of how far training moved them (a lost optimizer state moves
    the last step by about the learning rate, a third of that distance; exactness to 1e-6 is the CPU tests')."""
    import os
    import shutil
    import subprocess

    from safetensors.torch import load_file

    from recipes.core.launch.command import free_port, launch_command
    from recipes.core.output.records import read_metrics

    processes = torch.cuda.device_count() if torch.cuda.is_available() else 2
    args = [
        "--config", "recipes/configs/sft_smollm2.yaml", "--model_name_or_path", str(model),
        "--dataset_name", str(data), "--eval_split", "null", "--report_to", "none", "--mixed_precision", "bf16",
        "--warmup_steps", "0", "--max_seq_length", "128", "--max_train_samples", "16",
        "--per_device_train_batch_size", "2", "--global_batch_size", "8", "--learning_rate", "1e-4",
        "--loss_chunk_tokens", "0", "--save_steps", "1", "--output_dir", str(work / "fsdp2"),
    ]  # fmt: skip

    def run(*extra: str) -> str:
        cmd = launch_command(
            str(REPO / "recipes/sft.py"),
            [*args, *extra],
            str(REPO / "accelerate_configs/fsdp2.yaml"),
            processes,
            port=free_port(),
        )
        done = subprocess.run(cmd, cwd=REPO, env=os.environ, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        return done.stdout + done.stderr

    output = run()
    full = read_metrics(work / "fsdp2")
    final = load_file(str(work / "fsdp2" / "final" / "model.safetensors"))
    start = load_file(str(model / "model.safetensors"))
    shutil.rmtree(work / "fsdp2" / "final")
    run("--resume_from_checkpoint", str(work / "fsdp2" / "checkpoint-1"))
    resumed = load_file(str(work / "fsdp2" / "final" / "model.safetensors"))
    moved = max((final[k].float() - start[k].float()).abs().max().item() for k in start)
    diff = max((final[k] - resumed[k]).abs().max().item() for k in final)
    result = {
        "processes": processes,
        "sharded": f"FSDP2: parameters sharded over {processes} processes in bf16 (fp32 masters)" in output,
        "against_unsharded": compare(full, reference, BF16_REL),
        "resumed_records": compare(read_metrics(work / "fsdp2"), full, BF16_REL),
        "resumed_weight_difference": diff,
        "weights_moved": moved,
    }
    result["passed"] = (
        result["sharded"]
        and result["against_unsharded"]["passed"]
        and result["resumed_records"]["passed"]
        and diff <= 0.01 * moved
    )
    return result


def throughput(
    model: Path,
    data: Path,
    work: Path,
    shape: dict,
    seq_len: int,
    micro_batch: int,
    steps: int,
    device_name: str | None,
) -> dict:
    """Every lever on: packing, chunked loss, activation checkpointing, compilation, bf16."""
    from recipes.core.model.shape import model_shape
    from recipes.core.plan.flops import training_flops
    from recipes.core.plan.hardware import get_device
    from recipes.core.plan.model_shape import ModelShape

    records = train(
        model,
        data,
        work,
        "--packing",
        "true",
        "--gradient_checkpointing",
        "true",
        "--torch_compile",
        "true",
        "--pad_to_multiple_of",
        "256",
        "--max_seq_length",
        str(seq_len),
        "--per_device_train_batch_size",
        str(micro_batch),
        "--gradient_accumulation_steps",
        "1",
        "--max_train_samples",
        str(steps * micro_batch),
    )
    steps_run = [r for r in records if "loss" in r]
    [end] = [r for r in records if "train_runtime" in r]
    steady = steps_run[1:] or steps_run  # the first step compiles
    seconds = sum(r["step_time"] for r in steady)
    processed = len(steady) * micro_batch * seq_len  # packed rows of full-length samples
    counted: ModelShape = model_shape(str(model))
    flops_per_s = training_flops(counted, processed, seq_len) / seconds
    peak = get_device(device_name).peak_flops.get("bf16") if device_name else None
    return {
        "parameters": counted.total_params,
        "shape": shape,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "steps_measured": len(steady),
        "processed_tokens_per_second": processed / seconds,
        "target_tokens_per_second": sum(r["tokens"] for r in steady) / seconds,
        "model_tflops_per_second": flops_per_s / 1e12,
        "mfu": flops_per_s / peak if peak else None,
        "peak_memory_gib": end["peak_memory_mib_per_process"][0] / 1024,
        "compiled_graphs": end.get("compiled_graphs"),
    }


def qlora_rows(model: Path, data: Path, seq_len: int, steps: int) -> dict:
    """bench/qlora.py's runs on this device (LoRA fp32 and bf16, QLoRA nf4, full training with 8-bit
    AdamW), each its loop's peak memory and tokens/s next to `recipes plan`'s estimate."""
    from bench.job import Job
    from bench.qlora import qlora

    return qlora(Job(), model, data, seq_len, steps)


def grpo_row(model: Path, work: Path, steps: int, completion_length: int) -> dict:
    """The GRPO recipe's default job on `model` in bf16 on this device (random weights: what is measured
    is speed, not learning): seconds per step, generation seconds per generation batch (sampling and
    scoring), training seconds and generated tokens/s of sampling, medians over the steps after the
    first."""
    from bench.grpo import CONFIG, _median_after_first
    from bench.job import one_process_config, run, thread_env
    from recipes.core.launch.command import free_port, launch_command
    from recipes.core.output.records import read_metrics

    out = work / "grpo"
    args = [
        "--config",
        CONFIG,
        "--model_name_or_path",
        str(model),
        "--max_steps",
        str(steps),
        "--eval_split",
        "null",
        "--max_completion_length",
        str(completion_length),
        "--mixed_precision",
        "bf16",
        "--output_dir",
        str(out),
    ]
    run(launch_command("recipes/grpo.py", args, one_process_config(), 1, port=free_port()), thread_env(1))
    records = [r for r in read_metrics(out) if "loss" in r]
    sampled = [r for r in records if r["generation_time"] > 0]
    return {
        "steps": len(records),
        "max_completion_length": completion_length,
        "step_seconds": _median_after_first([r["step_time"] for r in records]),
        "generation_seconds": _median_after_first([r["generation_time"] for r in sampled]),
        "training_seconds": _median_after_first([r["training_time"] for r in records]),
        "generated_tokens_per_second": _median_after_first([r["generated_tokens_per_s"] for r in sampled]),
        "completion_tokens_per_step": _median_after_first([r["completion_tokens"] for r in records]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpu", help="device name in `recipes plan --gpu` terms, for MFU (e.g. H200-SXM)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the steps")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU: pass --dry-run to run the steps on tiny shapes on the CPU")
    started = time.perf_counter()
    tokenizer_from = str(REPO / ".cache/models/SmolLM2-135M-Instruct")
    seq_len = 128 if args.dry_run else 2048
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
        "dry_run": args.dry_run,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        data = long_conversations(
            work / "data",
            REPO / "recipes/data/sft_instructions",
            tokenizer_from,
            tokens=seq_len,
            count=64 if not args.dry_run else 16,
        )
        tiny = build_model(work / "tiny", TINY, tokenizer_from)
        print("[gpu_check] exactness", file=sys.stderr, flush=True)
        result["exactness"] = exactness(tiny, data, work / "exact", 128)
        shapes = {"Qwen2.5-0.5B": QWEN_05B, "Qwen2.5-1.5B": QWEN_15B}
        if args.dry_run:
            shapes = {"tiny": TINY}
        result["throughput"] = {}
        for name, shape in shapes.items():
            print(f"[gpu_check] throughput {name}", file=sys.stderr, flush=True)
            model = build_model(work / name, shape, tokenizer_from)
            result["throughput"][name] = throughput(
                model,
                data,
                work / f"run_{name}",
                shape,
                seq_len,
                micro_batch=4 if not args.dry_run else 2,
                steps=6 if not args.dry_run else 3,
                device_name=args.gpu,
            )
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # kept after every model
        qlora_model = work / ("tiny" if args.dry_run else "Qwen2.5-0.5B")
        print("[gpu_check] qlora", file=sys.stderr, flush=True)
        result["qlora"] = qlora_rows(qlora_model, data, 128 if args.dry_run else 1024, steps=3)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("[gpu_check] grpo", file=sys.stderr, flush=True)
        result["grpo"] = grpo_row(
            qlora_model, work, steps=3 if args.dry_run else 6, completion_length=16 if args.dry_run else 128
        )
    result["seconds"] = math.ceil(time.perf_counter() - started)
    result["passed"] = all(check["passed"] for check in result["exactness"].values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

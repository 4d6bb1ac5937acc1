"""Benchmark the recipes against what users would run instead; write a results JSON and print its table.

    python -m bench --out bench/results/cpu.json                 # all sections, on this machine's CPU
    python -m bench --sections throughput,padding --repeats 5
    python -m bench --device cuda --gpu H100-SXM --out bench/results/h100.json   # bf16 + MFU on a GPU
    python -m bench --table bench/results/cpu.json               # only print the table of a results file

Ratios come from runs made side by side, one repetition of each runner after the other, so they hold
on a busy machine; the table gives the median and range over the repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from bench import sections
from bench.job import REPO, Job
from bench.report import render_table

SECTIONS = (
    "throughput",
    "padding",
    "plan",
    "scale",
    "zero",
    "pipeline",
    "tokenization",
    "model_flops",
    "levers",
    "qlora",
    "grpo",
)


def machine(device: str) -> dict:
    import accelerate
    import deepspeed
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    description = gpu or f"{cores} CPU cores ({cpu}), {memory_gib:.0f} GiB"
    return {
        "description": description,
        "cpu": cpu,
        "cores": cores,
        "memory_gib": round(memory_gib, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "deepspeed": deepspeed.__version__,
        # glibc's allocator settings change a CPU process's resident set (freed blocks kept or returned)
        "allocator_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/latest.json", help="results JSON to write")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each side-by-side run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gpu", help="device name in `recipes plan --gpu` terms, for MFU (e.g. H100-SXM)")
    parser.add_argument("--model", default=Job.model, help="model of the throughput job")
    parser.add_argument("--samples", type=int, default=Job.samples, help="training samples of the job")
    parser.add_argument(
        "--table", metavar="RESULTS", help="print the table of an existing results file and stop"
    )
    parser.add_argument(
        "--update", action="store_true", help="rerun the chosen sections, keeping the others of --out"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(json.loads(Path(args.table).read_text())))
        return 0
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    os.chdir(REPO)
    job = Job(
        model=args.model,
        samples=args.samples,
        mixed_precision="bf16" if args.device == "cuda" else "no",
        micro_batch=8 if args.device == "cuda" else Job.micro_batch,
    )
    this_machine = machine(args.device)
    results = json.loads(Path(args.out).read_text()) if args.update and Path(args.out).is_file() else {}
    if results and (results["machine"], results["job"], results["repeats"]) != (
        this_machine,
        job.__dict__,
        args.repeats,
    ):
        parser.error(f"--update: {args.out} holds another machine, library versions, job or --repeats")
    results.update(
        {"date": datetime.date.today().isoformat(), "machine": this_machine, "repeats": args.repeats}
    )
    results.update({"job": job.__dict__, "measured_at": results.get("measured_at", {})})

    def step(name: str, fn):
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        results[name] = fn()
        results["measured_at"][name] = datetime.datetime.now().isoformat(timespec="seconds")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # kept after every section

    needs_runs = {"plan", "model_flops"} & set(chosen) and "throughput" not in results
    if "throughput" in chosen or needs_runs:
        step("throughput", lambda: sections.throughput_comparison(job, args.repeats, with_lora=True))
    if "padding" in chosen:
        step("padding", lambda: sections.padding_waste(job, micro_batch=8))
    if "plan" in chosen:
        step("plan", lambda: sections.plan_accuracy(job, 3, results["throughput"]["runs"]["recipe"]))
    if "scale" in chosen:
        model = sections.scale_model(REPO / ".cache/bench/llama-scale", job.model, hidden=1024, layers=12)
        step("scale", lambda: sections.scale(job.replace(micro_batch=1, max_seq_length=128), model, steps=3))
    if "zero" in chosen:
        from bench import levers

        model = levers.qwen_shaped_model(REPO / ".cache/bench/qwen2.5-0.5b-shape", job.model)
        step(
            "zero",
            lambda: sections.zero_memory(job.replace(micro_batch=1, max_seq_length=128), model, steps=2),
        )
    if "pipeline" in chosen:
        model = sections.scale_model(REPO / ".cache/bench/llama-scale", job.model, hidden=1024, layers=12)
        pipeline_job = job.replace(micro_batch=1, gradient_accumulation=4, max_seq_length=128)
        step("pipeline", lambda: sections.pipeline_memory(pipeline_job, model, steps=3))
    if "tokenization" in chosen:
        step("tokenization", lambda: sections.tokenization(job, copies=10))
    if "model_flops" in chosen:
        step("model_flops", lambda: sections.model_flops(job, results["throughput"], args.gpu))
    if "levers" in chosen:
        from bench import levers

        model = levers.qwen_shaped_model(REPO / ".cache/bench/qwen2.5-0.5b-shape", job.model)
        data = levers.long_conversations(
            REPO / ".cache/bench/long_chat", REPO / job.dataset, job.model, tokens=1024, count=8
        )
        step("levers", lambda: levers.levers(job, model, data, 1024, 3, args.device, args.gpu))
    if "qlora" in chosen:
        from bench import levers, qlora

        model = levers.qwen_shaped_model(REPO / ".cache/bench/qwen2.5-0.5b-shape", job.model)
        data = levers.long_conversations(
            REPO / ".cache/bench/long_chat", REPO / job.dataset, job.model, tokens=1024, count=8
        )
        step("qlora", lambda: qlora.qlora(job, model, data, 512, 3))
    if "grpo" in chosen:
        from bench import grpo

        step("grpo", lambda: grpo.grpo(steps=4))
    print(render_table(results))
    print(f"results: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a quantised base (QLoRA) and 8-bit optimizer states cost and save, on the Qwen2.5-0.5B-shaped
model of bench/levers.py: LoRA in fp32 and bf16, QLoRA (NF4) and full training with 8-bit AdamW, each a
recipe run's loop peak memory and throughput next to `recipes plan`'s memory estimate of the same run.

    python -m bench --sections qlora
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

# name: the recipe fields of the run
CONFIGS = {
    "LoRA fp32": {"use_peft": True},
    "LoRA bf16": {"use_peft": True, "mixed_precision": "bf16"},
    "QLoRA nf4": {"use_peft": True, "load_in_4bit": True},
    "full, 8-bit AdamW": {"optim": "adamw_8bit"},
}


def qlora(job, model: Path, data: Path, seq_len: int, steps: int) -> dict:
    from bench.job import one_process_config, run_recipe
    from bench.sections import planned_memory
    from recipes.core.model.shape import model_shape

    shape = model_shape(str(model))
    runs = {}
    for name, fields in CONFIGS.items():
        print(f"  qlora: {name}", file=sys.stderr, flush=True)
        configured = job.replace(
            model=str(model), dataset=str(data), samples=steps, micro_batch=1, gradient_accumulation=1,
            max_seq_length=seq_len, **fields,
        )  # fmt: skip
        result = run_recipe(configured)
        steady = result["step_times"][1:] or result["step_times"]  # the first step warms up
        estimate = planned_memory(configured, one_process_config())["total"]
        peak = result["peak_memory_mib_per_process"][0] * 2**20
        runs[name] = {
            "fields": fields,
            "peak_memory_bytes": peak,
            "setup_peak_memory_bytes": result["setup_peak_memory_mib_per_process"][0] * 2**20,
            "tokens_per_second": statistics.mean(result["step_tokens"][1:] or result["step_tokens"])
            / statistics.median(steady),
            "plan_estimate_bytes": estimate,
            "estimate_over_measured": estimate / peak,
        }
    return {
        "model": {"parameters": shape.total_params, "shape": "Qwen2.5-0.5B"},
        "seq_len": seq_len,
        "runs": runs,
    }

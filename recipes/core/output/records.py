"""What a run leaves behind to check it against its plan: plan.json, metrics.jsonl, config.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from recipes.core.config import save_config


class RunRecords:
    """Writes the run records; only the main process writes, the others hold a no-op instance.

    Nothing is written before `open`, which the run calls once its inputs are checked. Given an
    Accelerator with trackers (see core/output/tracking.py), each record's numbers also go to them, logged at
    the record's optimizer step.
    """

    def __init__(
        self, output_dir: str | Path, enabled: bool, accelerator: Any = None, resume_step: int | None = None
    ):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.accelerator = accelerator
        self.resume_step = resume_step

    def open(self) -> None:
        """Start metrics.jsonl: a new run starts a new file rather than appending to an old run's; a
        resumed run keeps the records up to its checkpoint's step and redoes the rest."""
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if self.resume_step is not None and (self.dir / "metrics.jsonl").is_file():
                kept = [r for r in read_metrics(self.dir) if r.get("step", 0) <= self.resume_step]
            (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_config(self, config: Any) -> None:
        if self.enabled:
            save_config(config, self.dir / "config.yaml")

    def write_plan(self, plan: dict) -> None:
        if self.enabled:
            (self.dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            if self.accelerator is not None and self.accelerator.log_with:
                numbers = {k: _plain(v) for k, v in record.items() if k != "step" and v is not None}
                numbers = {
                    k: v
                    for k, v in numbers.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                self.accelerator.log(numbers, step=record.get("step"))

    def log_eval(self, step: int, results: dict[str, float], log=print) -> None:
        """An evaluation's record (keys start with eval_) and its line on the console."""
        self.log({"step": step, **results})
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def log_step(
        self, plan: Any, *, epoch: int, window_index: int, logging_steps: int, **values: Any
    ) -> None:
        """The record of an optimizer step, every `logging_steps` and at the last step. `values` holds
        step, lr, loss, grad_norm, the step's counts and step_time; epoch becomes a fraction of epochs.
        A skipped step (on_nonfinite: skip) is always recorded."""
        step = values["step"]
        if step % logging_steps and step != plan.total_optimizer_steps and not values.get("skipped"):
            return
        grad_norm = values.pop("grad_norm")
        self.log(
            {
                "step": step,
                "epoch": round(epoch + (window_index + 1) / plan.optimizer_steps_per_epoch, 4),
                **values,
                "grad_norm": None if grad_norm is None else float(grad_norm),
            }
        )


def read_metrics(output_dir: str | Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

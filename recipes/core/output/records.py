"""What a run leaves behind to check it against its plan: plan.json, metrics.jsonl, config.yaml, and at its
end curves.png; every record also goes to the experiment trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from recipes.core.config import save_config
from recipes.core.output.plots import write_curves
from recipes.core.output.tracking import Trackers


class RunRecords:
    """Writes the run records; only the main process writes, the others hold a no-op instance.

    Nothing is written before `open`, which the run calls once its inputs are checked. Once the trackers
    are started (core/output/tracking.py), each record's numbers also go to them, logged at the record's
    optimizer step. A step's record is written every `logging_steps`.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        trackers: Trackers,
        *,
        logging_steps: int,
        resume_step: int | None = None,
    ):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.trackers = trackers
        self.logging_steps = logging_steps
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

    def start_tracking(self, config: Any) -> None:
        """Start the trackers, with `config` as the run's hyper-parameters."""
        if self.enabled:
            self.trackers.start(config)

    def log(self, record: dict) -> None:
        if self.enabled:
            record = {k: _plain(v) for k, v in record.items()}
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)

    def close(self, completed: bool) -> None:
        """At the end of the run: the trackers finish; a `completed` run (its final model saved) also gets
        curves.png, drawn from every record."""
        self.trackers.finish()
        if self.enabled and completed:
            write_curves(read_metrics(self.dir), self.dir / "curves.png")

    def log_eval(self, step: int, results: dict[str, float], log=print) -> None:
        """An evaluation's record (keys start with eval_) and its line on the console."""
        self.log({"step": step, **results})
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def log_step(self, plan: Any, *, epoch: int, window_index: int, **values: Any) -> None:
        """The record of an optimizer step, every `logging_steps` and at the last step. `values` holds
        step, lr, loss, grad_norm, the step's counts and step_time; epoch becomes a fraction of epochs.
        A skipped step (on_nonfinite: skip) is always recorded."""
        step = values["step"]
        if step % self.logging_steps and step != plan.total_optimizer_steps and not values.get("skipped"):
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

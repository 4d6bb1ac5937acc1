"""Experiment tracking through Accelerate's trackers: TensorBoard by default, others by name.

The `report_to` config field names the trackers ("tensorboard", "wandb", "all", a comma-separated
list, or "none"). Event files go to <output_dir>/<run name>/. Every metrics.jsonl record is forwarded
to the trackers by RunRecords, so the trackers, the plots and the records hold the same numbers.

The trackers are Accelerate's own classes, built and started here as `Accelerator.init_trackers` does,
so that a recipe without an Accelerator (the pipeline recipe drives a DeepSpeed engine) tracks exactly
as the others.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` asks for; an unknown or uninstalled one is an error naming the fix."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    available = sorted(str(t) for t in get_available_trackers())
    if names == ["all"]:
        return available
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"report_to asks for {', '.join(missing)}, which is not installed (available here: "
            f"{', '.join(available) or 'none'}); pip install the tracker's package or set report_to: "
            f"{','.join(n for n in names if n in available) or 'none'}"
        )
    return names


class Trackers:
    """The trackers `report_to` names for one run (checked when built, before anything is loaded); they
    run from `start` to `finish`, on the process that writes the records."""

    def __init__(self, report_to: str, output_dir: str, run_name: str):
        self.names = tracker_names(report_to)
        self.output_dir, self.run_name = output_dir, run_name
        self.running: list[GeneralTracker] = []

    def start(self, config: Any) -> None:
        """Start every tracker and store the config as the run's hyper-parameters."""
        for name in self.names:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            if tracker_class.requires_logging_directory:
                self.running.append(tracker_class(self.run_name, self.output_dir))
            else:
                self.running.append(tracker_class(self.run_name))
        for tracker in self.running:
            tracker.start()
        values = hparams(config)
        for tracker in self.running:
            tracker.store_init_configuration(values)

    def log(self, record: dict[str, Any]) -> None:
        """The numbers of a metrics.jsonl record, at its optimizer step."""
        if not self.running:
            return
        numbers = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.running:
            tracker.log(numbers, step=record.get("step"))

    def finish(self) -> None:
        """Flush and close every tracker (TensorBoard's event files are complete after this)."""
        for tracker in self.running:
            tracker.finish()
        self.running = []


def hparams(config: Any) -> dict[str, Any]:
    """The config flattened to the scalar types every tracker accepts."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in values.items()}

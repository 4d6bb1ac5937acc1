"""Experiment tracking through Accelerate's trackers: TensorBoard by default, others by name.

The `report_to` config field names the trackers ("tensorboard", "wandb", "all", a comma-separated
list, or "none"). Event files go to <output_dir>/<run name>/. Every metrics.jsonl record is forwarded
to the trackers by RunRecords, so the trackers, the plots and the records hold the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers


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


def tracker_kwargs(report_to: str, output_dir: str) -> dict[str, Any]:
    """Keyword arguments for Accelerator(...) that switch the requested trackers on."""
    names = tracker_names(report_to)
    return {"log_with": names, "project_dir": output_dir} if names else {}


def start_tracking(accelerator: Accelerator, run_name: str, config: Any) -> None:
    """Start the trackers (main process only) and store the config as the run's hyper-parameters."""
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config=hparams(config))


def hparams(config: Any) -> dict[str, Any]:
    """The config flattened to the scalar types every tracker accepts."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in values.items()}

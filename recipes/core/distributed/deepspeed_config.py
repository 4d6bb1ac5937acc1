"""The DeepSpeed config a run records: as the engine received it, every "auto" filled (by the recipe's
values, core/distributed/deepspeed_contract.py, and by Accelerate's own)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def save_resolved_config(accelerator: Any, output_dir: str | Path) -> None:
    """Write the DeepSpeed config as the engine received it (every "auto" filled) to output_dir/ds_config.json."""
    config = getattr(accelerator, "deepspeed_config", None)
    if config is None or not accelerator.is_main_process:
        return
    path = Path(output_dir) / "ds_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(config), indent=2) + "\n")


def _finite(value: Any) -> Any:
    # Accelerate sets steps_per_print to infinity, which JSON cannot hold.
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

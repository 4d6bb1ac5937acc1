"""The one `prepare` of every recipe: the model, its optimizer and loaders handed to the engine the launch
chose, with what that engine needs from the loaded model first.

- FSDP (an FSDP accelerate config): sharded by FSDP2, also on CPU processes where Accelerate would not
  (core/distributed/fsdp.py), after the wrap classes are checked against the model;
- DeepSpeed: the config's values that depend on the model (ZeRO-3's "auto" stage3_max_live_parameters
  and stage3_max_reuse_distance) are filled, then Accelerate hands model and config to DeepSpeed;
- DDP or one process: as Accelerate prepares them.
"""

from __future__ import annotations

import os
from typing import Any

from recipes.core.distributed.deepspeed_contract import fill_model_values
from recipes.core.distributed.fsdp import prepare_sharded
from recipes.core.distributed.fsdp_contract import requested as fsdp_requested


def prepare(accelerator: Any, model: Any, optimizer: Any, *others: Any) -> tuple:
    """`accelerator.prepare(model, optimizer, *others)` for the engine of this launch (see above)."""
    if fsdp_requested(os.environ):
        return prepare_sharded(accelerator, model, optimizer, *others)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        fill_model_values(plugin.deepspeed_config, model)
    return accelerator.prepare(model, optimizer, *others)

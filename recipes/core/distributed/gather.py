"""The whole weights of a sharded model, once per generation batch.

Sampling runs the model once per generated token. Under ZeRO-3 and FSDP2 every forward gathers each
layer's parameters from the ranks and frees them again, so generating token by token would gather the
whole model once per token. `whole_weights` gathers every parameter once, keeps it whole while the caller
generates (no gathering or freeing per forward), and returns the model to its shards afterwards:

- ZeRO-3: `deepspeed.zero.GatheredParameters` over all parameters, with the engine's per-module fetch and
  release hooks taken off meanwhile (left on, they release each layer after its forward), then put back;
- FSDP2: every unit unsharded, with resharding after forward switched off meanwhile, then resharded;
- DDP, ZeRO-1/2 or one process: the unwrapped model as it is (every rank holds the whole weights).

Every rank must enter it together (the gathers are collectives); what runs inside may differ per rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def whole_weights(accelerator: Any, model: Any) -> Iterator[Any]:
    """The unwrapped model with every parameter whole, for `generate` (see the module docstring)."""
    unwrapped = accelerator.unwrap_model(model)
    if any(hasattr(p, "ds_id") for p in unwrapped.parameters()):
        with _zero3_gathered(model, unwrapped):
            yield unwrapped
        return
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in unwrapped.modules() if isinstance(module, FSDPModule)]
    if not units:
        yield unwrapped
        return
    resharding = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield unwrapped
    finally:
        for unit, reshards in zip(units, resharding, strict=True):
            unit.reshard()
            unit.set_reshard_after_forward(reshards, recurse=False)


def _reshards_after_forward(unit: Any) -> bool:
    """Whether an FSDP2 unit reshards after forward (fsdp_reshard_after_forward; the root does not). FSDP2 has
    a setter but no getter: its parameter group keeps a post-forward mesh exactly when it reshards."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


@contextlib.contextmanager
def _zero3_gathered(engine: Any, unwrapped: Any) -> Iterator[None]:
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
        for parameter in unwrapped.parameters():
            parameter.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)

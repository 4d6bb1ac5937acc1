"""AdamW with the usual split: no weight decay on biases and normalisation weights; PyTorch's, or
bitsandbytes' with 8-bit states.

The names are TrainingArguments' `optim` values. bitsandbytes' 8-bit AdamW keeps momentum and variance
block-wise quantised to 8 bits (2 bytes per parameter instead of 8, plus a 4-byte scale per block of 256),
for tensors of at least 4,096 elements; smaller ones keep 32-bit states. "paged" states move to host
memory when a GPU runs out (on a CPU there is nothing to page: the same update as unpaged).
No torch import at module level, so that `recipes doctor` can read the names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from recipes.core.config import ConfigError, Problem

if TYPE_CHECKING:
    import torch

TORCH_OPTIMIZERS = {"adamw_torch_fused": {"fused": True}, "adamw_torch": {"fused": False}}
# name -> the bitsandbytes.optim class
BITSANDBYTES_OPTIMIZERS = {
    "adamw_bnb_8bit": "AdamW8bit",
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
OPTIMIZERS = (*TORCH_OPTIMIZERS, *BITSANDBYTES_OPTIMIZERS)
EIGHT_BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states


def problems(recipe: Mapping[str, Any]) -> Iterator[Problem]:
    """An `optim` the recipes do not know (a key of the recipe config)."""
    optim = recipe.get("optim", "adamw_torch_fused")
    if optim not in OPTIMIZERS:
        yield "optim", f"{optim!r} is not supported", f"use one of {', '.join(OPTIMIZERS)}"


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    found = next(problems(vars(cfg)), None)
    if found is not None:
        _, problem, fix = found
        raise ConfigError(f"optim {problem}; {fix}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hyper = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    groups = [g for g in groups if g["params"]]
    if cfg.optim in BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[cfg.optim])(groups, **hyper)
    import torch

    return torch.optim.AdamW(groups, **hyper, **TORCH_OPTIMIZERS[cfg.optim])

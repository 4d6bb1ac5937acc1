"""AdamW with the usual split: no weight decay on biases and normalisation weights."""

from __future__ import annotations

import torch

from recipes.core.config import ConfigError

# TrainingArguments' names for them; "fused" updates every tensor in one kernel per step.
OPTIMIZERS = {"adamw_torch_fused": {"fused": True}, "adamw_torch": {"fused": False}}


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    if cfg.optim not in OPTIMIZERS:
        raise ConfigError(f"optim {cfg.optim!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        **OPTIMIZERS[cfg.optim],
    )

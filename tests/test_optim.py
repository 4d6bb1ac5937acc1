"""AdamW as the recipes build it: fused or per-tensor, the same update; no decay on norms and biases."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import float32_tolerance

from recipes.core.config import ConfigError
from recipes.core.model.optimizer import make_optimizer


def config(optim: str) -> SimpleNamespace:
    return SimpleNamespace(
        optim=optim, learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8
    )


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def test_fused_and_per_tensor_adamw_make_the_same_updates():
    fused, plain = model(), model()
    opt_fused, opt_plain = (
        make_optimizer(fused, config("adamw_torch_fused")),
        make_optimizer(plain, config("adamw_torch")),
    )
    assert opt_fused.defaults["fused"] and not opt_plain.defaults["fused"]
    start = copy.deepcopy(plain.state_dict())
    steps, cfg = 5, config("adamw_torch")
    for step in range(steps):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in ((fused, opt_fused), (plain, opt_plain)):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        # Each step both compute AdamW's update, about a dozen roundings of a step of at most the LR plus
        # the decay, in their own order, and round the new weight to u of its size; the steps' differences add.
        weight = max(a.abs().max().item(), start[name].abs().max().item())
        step_size = cfg.learning_rate * (1 + cfg.weight_decay * weight)
        tolerance = steps * (float32_tolerance(1, weight) + float32_tolerance(12, step_size))
        assert (a - b).abs().max() <= tolerance, name
        assert (a - start[name]).abs().max() > 1e-3, name  # and the weights did move


def test_norm_weights_and_biases_are_not_decayed():
    m = model()
    decay, no_decay = make_optimizer(m, config("adamw_torch_fused")).param_groups
    assert [p.shape for p in decay["params"]] == [(16, 8), (4, 16)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # two biases, the norm's weight and bias


def test_an_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(
        ConfigError, match="optim 'sgd' is not supported; use one of adamw_torch_fused, adamw_torch"
    ):
        make_optimizer(model(), config("sgd"))

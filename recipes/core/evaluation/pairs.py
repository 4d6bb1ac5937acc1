"""Evaluation of a model on preference pairs (DPO, reward models): the loss and per-pair metrics averaged
over every pair of a split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


@torch.no_grad()
def evaluate_pairs(
    accelerator: Any,
    model: Any,
    loader: Iterable[dict[str, torch.Tensor]],
    losses_and_metrics: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    metrics: Sequence[str],
) -> dict[str, float]:
    """eval_loss and eval_<metric> averaged over every pair the prepared `loader` holds (the duplicates
    uneven sharding adds dropped); `losses_and_metrics(batch)` gives each pair's loss and its `metrics`."""
    model.eval()
    rows = []
    for batch in loader:
        losses, values = losses_and_metrics(batch)
        rows.append(accelerator.gather_for_metrics(torch.cat([losses[:, None].float(), values], dim=1)))
    model.train()
    means = torch.cat(rows).double().mean(dim=0).tolist()
    return dict(zip(("eval_loss", *(f"eval_{name}" for name in metrics)), means, strict=True))

"""Gradient accumulation that is exactly a bigger batch, for losses averaged over target tokens.

Averaging each micro-batch's loss and then the micro-batches weighs a token in a short micro-batch
more than one in a long micro-batch. The exact big-batch gradient divides the summed token loss by the
target tokens of the whole window on every data-parallel rank, so a window is read before its first
backward and its token count is summed over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F

from recipes.core.data.chat import IGNORE_INDEX

B = TypeVar("B")


def accumulation_windows(batches: Iterable[B], gradient_accumulation_steps: int) -> Iterator[list[B]]:
    """Group micro-batches into optimizer-step windows; the last one of an epoch may be shorter."""
    window: list[B] = []
    for batch in batches:
        window.append(batch)
        if len(window) == gradient_accumulation_steps:
            yield window
            window = []
    if window:
        yield window


def target_tokens(labels: torch.Tensor) -> int:
    """Target tokens of a batch: the labels the next-token loss counts."""
    return int(labels[:, 1:].ne(IGNORE_INDEX).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens, and the number of those tokens."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


def per_sample_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed token loss and target-token count (for evaluation gathered across ranks)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def eval_loss_results(loss: float) -> dict[str, float]:
    """The eval record of a token-averaged loss."""
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def backward_scale(
    window_tokens_all_ranks: int, data_parallel_size: int, gradient_accumulation_steps: int
) -> float:
    """Factor for a micro-batch's summed loss so that the accumulated, rank-averaged gradient is the
    gradient of (sum of token losses in the window on all ranks) / (their count).

    Data parallelism averages gradients over ranks and `accelerator.backward` (or, under DeepSpeed, the
    engine) divides by the accumulation steps; both are undone here.
    """
    return data_parallel_size * gradient_accumulation_steps / window_tokens_all_ranks

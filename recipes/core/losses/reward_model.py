"""A reward model's loss on preference pairs (Bradley-Terry), in TRL's RewardTrainer terms.

The model scores a sequence with one number r (a sequence-classification head with one output, read at
the sequence's last token that is not padding, as transformers pools it). The probability that the chosen
completion is preferred is sigmoid(r_chosen - r_rejected), so a pair's loss is

    -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient x (r_chosen + r_rejected)^2

with `margin` a pair's own column where the data have one (how much better the chosen reply is; 0
otherwise) and the centring term (Eisenstein et al., 2023) keeping rewards near 0, which the pair loss
alone leaves free. The recipe averages it over all pairs of an optimizer step on all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("accuracy", "margin", "chosen", "rejected")  # per pair; the recipe averages them over a step


def chosen_and_rejected(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of a pair batch's chosen and rejected sequences (PairCollator: chosen first)."""
    rewards = scores.float().reshape(-1)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Each pair's loss (module docstring)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference.device)
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair [pairs, METRICS]: whether the chosen reply scored higher, by how much, and both rewards."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return torch.stack([(chosen > rejected).float(), chosen - rejected, chosen, rejected], dim=1)

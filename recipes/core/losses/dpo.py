"""The DPO family of preference losses and the rewards they imply, from summed log-probabilities.

With p the policy's and r the reference's log-probability of a completion's target tokens given its prompt
(summed over the tokens), a completion's implicit reward is beta (p - r), and each loss is a function of
h = (p_chosen - r_chosen) - (p_rejected - r_rejected), the chosen reward's margin over the rejected one
divided by beta:

    sigmoid  DPO (Rafailov et al. 2023)    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
             (e = label_smoothing: the pair's label is taken as wrong with probability e, "conservative DPO")
    robust   Chowdhury et al. 2024         (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)
    hinge    SLiC (Zhao et al. 2023)       max(0, 1 - beta h)
    ipo      Azar et al. 2023              (h - 1 / (2 beta))^2, on summed log-probabilities as in the paper
                                           (TRL averages them over each completion's tokens first)

While the policy is the reference (the first step), h = 0: the sigmoid loss is ln 2 and every reward 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recipes.core.config import ConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED = ("sigmoid", "robust")  # the loss types label_smoothing applies to
# Per-pair values averaged into each step's record and each evaluation (eval_ prefixed there).
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def check_loss_config(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}; use one of them")
    if beta <= 0:
        raise ConfigError(f"beta is {beta:g}; it must be > 0 (typical values: 0.01 to 0.5)")
    if label_smoothing and loss_type not in SMOOTHED:
        raise ConfigError(
            f"label_smoothing {label_smoothing:g} has no meaning for loss_type {loss_type}; set it to 0 or "
            f"use loss_type {' or '.join(SMOOTHED)}"
        )
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"label_smoothing is {label_smoothing:g}; it must be in [0, 0.5) (the chance that a pair's "
            "preference is wrong)"
        )


def pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss of every pair (see the module docstring) from its four summed log-probabilities."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        smoothed = -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
        return smoothed / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


@torch.no_grad()
def pair_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per pair (rows), the METRICS in their order: the rewards of chosen and rejected, whether chosen's is
    the higher (accuracy), its margin, and the policy's log-probabilities of chosen and rejected."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return torch.stack(
        [chosen, rejected, (chosen > rejected).float(), chosen - rejected, policy_chosen, policy_rejected],
        dim=1,
    ).float()


def chosen_and_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of a batch's sequences split into the chosen ones and the rejected ones (the pair
    collator puts every chosen sequence first)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]

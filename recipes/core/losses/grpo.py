"""GRPO's objective: group-relative advantages and the clipped surrogate, in TRL's GRPOConfig terms.

- Advantages: each completion's reward less the mean reward of its prompt's group (the num_generations
  completions of that prompt, wherever they were trained), divided by the group's standard deviation
  (`scale_rewards: group`, the default), by the generation batch's (`batch`) or not at all (`none`).
- Per completion token t of completion i: the importance ratio r = exp(logp - logp_old) against the
  policy that sampled the completions, and the loss -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon_high) A_i),
  plus `beta` x KL to a reference (the estimator exp(d) - d - 1 with d = logp_ref - logp, which is >= 0
  and 0 where the policies agree). On the first pass over a generation batch logp_old is logp itself, so
  r = 1 and the loss of a token is -A_i.
- Normalisation, by `loss_type`: every loss is a weighted sum of token losses, sum_i w_i sum_t l_it / D,
  with the weights per completion and the divisor over the whole optimizer step on all ranks, so that
  accumulation and data parallelism are exactly one big batch:
  `dapo` (default): w_i = 1, D = completion tokens of the step (a token mean);
  `grpo`: w_i = 1 / n_i, D = completions of the step (each completion's token mean, then their mean);
  `dr_grpo`: w_i = 1, D = completions x max_completion_length (a constant per completion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # keeps a group whose rewards are all equal (std 0) at advantage 0, not NaN


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> torch.Tensor:
    """Advantages of a generation batch's rewards, ordered by prompt (num_generations consecutive
    completions per prompt)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPSILON)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + STD_EPSILON)
    return centred.reshape(-1)


@dataclass(frozen=True)
class Clipping:
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher; None: epsilon on both sides

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clipping: Clipping = Clipping(),
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token losses [completions, tokens], whether each token's ratio was clipped, and the per-token KL
    (None without a reference). `advantages` has one value per completion."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clipping.epsilon, 1 + clipping.high)
    advantage = advantages.unsqueeze(1)
    unclipped_term, clipped_term = ratio * advantage, clipped * advantage
    losses = -torch.min(unclipped_term, clipped_term)
    was_clipped = clipped_term < unclipped_term
    kl = None
    if beta and ref_logps is not None:
        difference = ref_logps - logps
        kl = torch.exp(difference) - difference - 1
        losses = losses + beta * kl
    return losses, was_clipped, kl


def completion_weights(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """w_i of each completion (module docstring): 1, or 1 / its tokens for `grpo`."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "grpo":
        return 1.0 / mask.sum(dim=1).clamp(min=1).to(torch.float32)
    return torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device)


def step_divisor(
    step_tokens: int, step_completions: int, loss_type: str, max_completion_length: int
) -> float:
    """D of a whole optimizer step on all ranks (module docstring)."""
    if loss_type == "dapo":
        return float(max(step_tokens, 1))
    if loss_type == "grpo":
        return float(step_completions)
    return float(step_completions * max_completion_length)


def weighted_sum(losses: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """sum_i w_i sum_t l_it over a micro-batch's completion tokens (`mask` 1 on them): divided by the
    step's divisor, the micro-batch's share of the step's loss."""
    per_completion = (losses * mask).sum(dim=1)
    return (per_completion * completion_weights(mask, loss_type)).sum()

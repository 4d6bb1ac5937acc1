"""GRPO's objective against its closed forms: group-relative advantages, a first pass whose importance
ratio is exactly 1, clipping on each side, the KL estimator, and micro-batches that add up to the step."""

from __future__ import annotations

import pytest
import torch
from helpers import float32_tolerance

from recipes.core.losses.grpo import (
    STD_EPSILON,
    Clipping,
    completion_weights,
    group_advantages,
    step_divisor,
    token_losses,
    weighted_sum,
)

G, L = 4, 6  # generations per prompt, completion tokens at most


def completions(seed: int = 0, prompts: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probabilities, a mask of each completion's tokens (lengths 1..L) and rewards."""
    generator = torch.Generator().manual_seed(seed)
    n = prompts * G
    logps = -torch.rand(n, L, generator=generator) * 3
    lengths = torch.randint(1, L + 1, (n,), generator=generator)
    mask = (torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.randint(0, 3, (n,), generator=generator).float()
    return logps, mask, rewards


def test_advantages_are_the_reward_less_its_groups_mean_over_the_groups_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # the second group has no spread
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased, as torch.std computes it
    expected = [0.5 / (std + STD_EPSILON), -0.5 / (std + STD_EPSILON)] * 1
    advantages = group_advantages(rewards, 4)
    assert advantages.tolist()[:4] == pytest.approx(
        [expected[0], expected[1], expected[1], expected[0]], rel=1e-6
    )
    assert advantages[4:].tolist() == [0.0] * 4  # nothing to learn from a group of equal rewards
    assert group_advantages(rewards, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    batch = group_advantages(rewards, 4, "batch")
    assert batch.tolist() == pytest.approx(
        (group_advantages(rewards, 4, "none") / (rewards.std() + STD_EPSILON)).tolist()
    )
    with pytest.raises(ValueError, match="scale_rewards must be one of group, batch, none, got 'std'"):
        group_advantages(rewards, 4, "std")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_first_pass_has_ratio_1_and_the_closed_form_loss_and_gradient(loss_type):
    logps, mask, rewards = completions()
    advantages = group_advantages(rewards, G)
    logps = logps.clone().requires_grad_(True)
    losses, clipped, kl = token_losses(logps, logps.detach(), advantages)
    assert kl is None and not clipped.any()
    assert torch.equal(losses, (-advantages).unsqueeze(1).expand_as(losses))  # r = exp(0) = 1 exactly
    n_i, n = mask.sum(dim=1), mask.shape[0]
    divisor = step_divisor(int(mask.sum()), n, loss_type, L)
    loss = weighted_sum(losses, mask, loss_type) / divisor
    weights = {"dapo": torch.ones(n), "grpo": 1 / n_i, "dr_grpo": torch.ones(n)}[loss_type]
    expected_divisor = {"dapo": mask.sum().item(), "grpo": n, "dr_grpo": n * L}[loss_type]
    assert divisor == expected_divisor
    closed_form = -(advantages * n_i * weights).sum() / expected_divisor
    # Two orders of one sum of n x L terms of magnitude |A|: their rounding.
    assert abs(loss.item() - closed_form.item()) <= float32_tolerance(
        n * L, (advantages.abs() * n_i).sum().item()
    )
    loss.backward()
    expected_gradient = -(advantages * weights).unsqueeze(1) * mask / expected_divisor
    # Each element: a product and a division, in either order: at most 4 roundings apart.
    assert torch.allclose(logps.grad, expected_gradient, rtol=4 * 2.0**-24, atol=0)


def test_micro_batches_add_up_to_the_step_whatever_the_split():
    """The divisor is the whole step's: any split into micro-batches (and ranks) sums to the step's loss."""
    logps, mask, rewards = completions(1, prompts=4)
    advantages = group_advantages(rewards, G)
    old = logps - 0.1 * torch.rand_like(logps)  # a later pass: ratios away from 1
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        divisor = step_divisor(int(mask.sum()), mask.shape[0], loss_type, L)
        whole, _, _ = token_losses(logps, old, advantages)
        total = weighted_sum(whole, mask, loss_type) / divisor
        parts = 0.0
        for rows in (slice(0, 3), slice(3, 4), slice(4, 11), slice(11, 16)):
            part, _, _ = token_losses(logps[rows], old[rows], advantages[rows])
            parts = parts + weighted_sum(part, mask[rows], loss_type) / divisor
        weights = completion_weights(mask, loss_type)
        magnitude = ((whole.abs() * mask).sum(dim=1) * weights).sum().item() / divisor
        assert abs(parts.item() - total.item()) <= float32_tolerance(mask.numel() + 4, magnitude), loss_type


def test_clipping_stops_the_gradient_beyond_epsilon_on_the_side_the_advantage_pushes():
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [1.1], [0.5], [0.9]])).requires_grad_(True)  # ratios
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    losses, clipped, _ = token_losses(logps, old, advantages, Clipping(epsilon=0.2, epsilon_high=0.28))
    # 1.5 > 1 + 0.28 with A > 0 and 0.5 < 1 - 0.2 with A < 0: clipped; the others inside the range.
    assert clipped.squeeze(1).tolist() == [True, False, True, False]
    # exp(log(x)) and a product in float32: a few roundings of 2^-24 each, well inside 1e-6.
    assert losses.squeeze(1).tolist() == pytest.approx([-1.28, -1.1, 0.8, 0.9], rel=1e-6)
    losses.sum().backward()
    assert logps.grad.squeeze(1).tolist()[0] == 0.0 and logps.grad.squeeze(1).tolist()[2] == 0.0


def test_the_kl_to_the_reference_is_0_where_the_policies_agree_and_positive_elsewhere():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    advantages = torch.zeros(1)
    _, _, same = token_losses(logps, logps, advantages, ref_logps=logps.clone(), beta=0.1)
    assert same.tolist() == [[0.0, 0.0]]
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    losses, _, kl = token_losses(logps, logps, advantages, ref_logps=ref, beta=0.1)
    d = ref - logps
    assert torch.equal(kl, torch.exp(d) - d - 1) and (kl > 0).all()
    assert torch.equal(losses, 0.1 * kl)  # zero advantages: only the KL term

"""The critic-free advantage estimators and the loss aggregations against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.estimators import (aggregate, grouped, grpo_advantages, per_token, reinforce_pp_advantages,
                                 rloo_advantages)


def close(actual: torch.Tensor, expected: list, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_grpo_normalises_within_each_group():
    # Groups (1, 2) and (3, 4): mean 1.5 and 3.5, sample std sqrt(0.5) each.
    std = math.sqrt(0.5) + 1e-6
    close(grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), [-0.5 / std, 0.5 / std, -0.5 / std, 0.5 / std])
    # One group of four: mean 2.5, sample std sqrt(5/3).
    std = math.sqrt(5 / 3) + 1e-6
    close(grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4), [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std])


def test_grpo_without_the_std_only_centres():
    close(grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0, 6.0]), 3, scale_by_std=False),
          [-2.0, 0.0, 2.0, -2.0, -2.0, 4.0])


def test_a_group_of_equal_rewards_gets_exactly_zero():
    # 0.1 three times: the float mean is not 0.1, and its "std" is rounding noise; the advantage must still be 0.
    for estimator in (lambda r: grpo_advantages(r, 3), lambda r: grpo_advantages(r, 3, scale_by_std=False),
                      lambda r: rloo_advantages(r, 3)):
        out = estimator(torch.tensor([0.1, 0.1, 0.1, 1.0, 3.0, 6.0]))
        assert torch.equal(out[:3], torch.zeros(3))
        assert (out[3:] != 0).all()


def test_grpo_with_groups_of_one_gives_zero():
    assert torch.equal(grpo_advantages(torch.tensor([1.0, -2.0, 5.0]), 1), torch.zeros(3))


def test_rloo_subtracts_the_mean_of_the_others():
    # 1 - (2 + 4) / 2, 2 - (1 + 4) / 2, 4 - (1 + 2) / 2; then a group of two: 5 - 1 and 1 - 5.
    close(rloo_advantages(torch.tensor([1.0, 2.0, 4.0, 5.0, 1.0, 3.0]), 3), [-2.0, -0.5, 2.5, 3.0, -3.0, 0.0])
    close(rloo_advantages(torch.tensor([5.0, 1.0]), 2), [4.0, -4.0])
    # The same as G / (G - 1) times the centred reward.
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    centred = grouped(rewards, 4) - grouped(rewards, 4).mean(-1, keepdim=True)
    torch.testing.assert_close(rloo_advantages(rewards, 4), (4 / 3 * centred).reshape(-1))


def test_group_errors():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.ones(6), 4)


def test_reinforce_pp_returns_are_the_rewards_to_go_whitened_over_the_batch():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = reinforce_pp_advantages(rewards, mask)
    close(returns, [[3.0, 2.0, 2.0], [1.5, 1.0, 0.0]])  # the 7 is padding
    # Valid returns 3, 2, 2, 1.5, 1: mean 1.9, sample variance 2.2 / 4.
    std = math.sqrt(0.55 + 1e-8)
    close(advantages, [[1.1 / std, 0.1 / std, 0.1 / std], [-0.4 / std, -0.9 / std, 0.0]], tol=1e-5)
    _, discounted = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    close(discounted, [[1.0 + 0.5 * (0.0 + 0.5 * 2.0), 0.0 + 0.5 * 2.0, 2.0], [0.5 + 0.5 * 1.0, 1.0, 0.0]])


def test_a_response_advantage_goes_on_each_of_its_tokens():
    close(per_token(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]])), [[2.0, 2.0, 0.0],
                                                                                       [-1.0, 0.0, 0.0]])


VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("how, expected", [
    ("token_mean", (1 + 2 + 3 + 4 + 5) / 5),  # every token the same weight
    ("seq_mean_token_mean", (2.0 + 4.5) / 2),  # each response's mean, then the mean over responses
    ("seq_mean_token_sum_norm", 15 / (3 * 2)),  # a constant normaliser: max tokens x responses
])
def test_loss_aggregations(how, expected):
    whole = aggregate(VALUES, MASK, how, num_tokens=5, num_sequences=2, max_tokens=3)
    assert whole.item() == pytest.approx(expected, abs=1e-6)
    # Micro-batches normalised by the whole minibatch's counts add up to the minibatch's loss.
    parts = sum(aggregate(VALUES[i:i + 1], MASK[i:i + 1], how, num_tokens=5, num_sequences=2, max_tokens=3)
                for i in range(2))
    assert parts.item() == pytest.approx(expected, abs=1e-6)


def test_an_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        aggregate(VALUES, MASK, "mean", num_tokens=5, num_sequences=2, max_tokens=3)

"""KL-shaped per-token rewards and generalised advantage estimation."""

from __future__ import annotations

import torch


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row of a prefix mask; -1 for an empty row. [B]."""
    return response_mask.long().sum(-1) - 1


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every response token plus the sequence score on the last one
    (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020, eq. 1).

    scores: [B]; kl, response_mask: [B, T] (prefix mask, at least one valid token per row; ValueError otherwise).
    Returns [B, T], 0 on padding.
    """
    mask = response_mask.bool()
    # The score goes to index count - 1, the last token only when each row's tokens come first (right padding).
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("response_mask must be right-padded (each row's valid tokens first, then padding): a row "
                         "has a valid token after padding, so its score would land on the wrong token. Build "
                         "responses as [prompt (left-padded) | response (right-padded)], as rlhf.ppo.rollout does")
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_token_index(mask)
    if (last < 0).any():
        raise ValueError("every response needs at least one valid token to receive its score")
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over each response, with the value after the
    last valid token taken as 0 (the episode ends there).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns_t = A_t + V_t.

    rewards, values, response_mask: [B, T]. Returns ``(advantages, returns)``, each [B, T], 0 on padding.
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        # Past the end of a response the next value and advantage are 0; mask[:, t] zeroes padding positions.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns

"""Critic-free advantage estimators and the ways a per-token loss is aggregated.

Critic-free estimators sample several responses per prompt (a *group*: ``rollout.samples_per_prompt`` rows next to
each other in the batch) and use the other responses to the same prompt as the baseline, instead of a learned value
function:

- **GRPO** (Shao et al. 2024, DeepSeekMath, §4.1.2, outcome supervision): A_i = (r_i - mean(r)) / std(r) over the
  group, the same advantage on every token of response i. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training", §3.1) leaves out the division by std(r), which weights prompts of low reward spread (too easy or too
  hard) up: ``scale_by_std=False``.
- **RLOO** (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024, eq. 6): the
  leave-one-out baseline, A_i = r_i - (sum_{j != i} r_j) / (G - 1) = G / (G - 1) (r_i - mean(r)). Needs G >= 2.
- **REINFORCE++** (Hu 2025, arXiv:2501.03262, §3): no group is needed; per-token rewards carry the KL penalty and the
  score on the last token, the return is the discounted sum of the rewards to go, and the advantages are the returns
  normalised over the whole (global) batch.

A group whose rewards are all equal carries no signal: its advantages are exactly 0 (not rounding noise divided by a
standard deviation of rounding noise).

Shapes: ``B`` responses (a multiple of the group size ``G``), ``T`` response tokens; masks are right-padded prefix
masks as everywhere in :mod:`rlhf.ppo`.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.ppo.masked import masked_sum, moments, whiten

#: `ppo.advantage_estimator` choices: GAE with the critic (PPO) and the critic-free ones.
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")

#: `ppo.loss_aggregation` choices (see `aggregate`).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / G, G]: row g holds the responses to the g-th prompt. ValueError when G does not divide B."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} responses do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def _zero_where_tied(advantages: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Advantages [B/G, G] set to exactly 0 in the groups whose rewards are all equal."""
    tied = (groups.amax(-1) == groups.amin(-1)).unsqueeze(-1)
    return torch.where(tied, torch.zeros((), dtype=advantages.dtype, device=advantages.device), advantages)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages: each response's reward minus its group's mean, divided by the group's standard
    deviation (Bessel-corrected, as ``torch.std``) plus ``eps`` when ``scale_by_std``. A group of one, or of equal
    rewards, gets 0. rewards: [B] -> [B]."""
    groups = grouped(rewards.float(), group_size)
    advantages = groups - groups.mean(-1, keepdim=True)
    if scale_by_std and group_size > 1:
        advantages = advantages / (groups.std(-1, keepdim=True) + eps)
    return _zero_where_tied(advantages, groups).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages: each response's reward minus the mean reward of the other responses to its prompt.
    rewards: [B] -> [B]. ValueError for groups of fewer than 2."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 responses per prompt")
    groups = grouped(rewards.float(), group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return _zero_where_tied(groups - others, groups).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0,
                            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: returns G_t = sum_{s >= t} gamma^(s - t) r_s over each response, and the advantages, the returns
    whitened over the valid tokens of the batch. ``reduce`` sums `rlhf.ppo.masked.moments` over all processes (the
    global batch); default this batch's alone. rewards, response_mask: [B, T]. Returns ``(advantages, returns)``, 0
    on padding."""
    mask = response_mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    stats = moments(returns, response_mask)
    return whiten(returns, response_mask, stats=reduce(stats) if reduce is not None else stats), returns


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A response-level advantage [B] on every token of its response: [B, T], 0 on padding."""
    mask = response_mask.to(advantages.dtype)
    return advantages.unsqueeze(-1) * mask


def aggregate(values: torch.Tensor, response_mask: torch.Tensor, how: str, *,
              num_tokens: float | torch.Tensor, num_sequences: int, max_tokens: int) -> torch.Tensor:
    """A per-token loss [B, T] as one number, ``how``:

    - ``token_mean``: the sum over valid tokens / ``num_tokens`` (every token weighs the same; long responses weigh
      more). PPO's form (Ouyang et al. 2022; TRL, OpenRLHF).
    - ``seq_mean_token_mean``: each response's token mean, summed and divided by ``num_sequences`` (every response
      weighs the same; GRPO's form in Shao et al. 2024, eq. 3).
    - ``seq_mean_token_sum_norm``: the sum over valid tokens / (``max_tokens`` x ``num_sequences``), a constant
      normaliser (Dr. GRPO, Liu et al. 2025: no length bias in either direction).

    ``num_tokens`` and ``num_sequences`` count the whole minibatch (over processes and micro-batches), so that the
    parts a minibatch is split into add up to its loss."""
    mask = response_mask.bool()
    if how == "token_mean":
        return masked_sum(values, mask) / torch.as_tensor(num_tokens, device=values.device).clamp(min=1).float()
    if how == "seq_mean_token_mean":
        lengths = mask.sum(-1).clamp(min=1).to(values.dtype)
        return (masked_sum(values, mask, dim=-1) / lengths).sum() / max(num_sequences, 1)
    if how == "seq_mean_token_sum_norm":
        return masked_sum(values, mask) / float(max(max_tokens, 1) * max(num_sequences, 1))
    raise ValueError(f"loss aggregation {how!r} is not one of {', '.join(AGGREGATIONS)}")

"""PPO losses and the per-token quantities they need. Each loss returns ``(loss, stats)``: the loss is a sum over
valid tokens divided by ``num_tokens`` (the token count of the whole minibatch on all processes, so that sharded
minibatches add up to the global loss), and the stats are detached tensors normalised the same way."""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.ppo.masked import masked_sum


def _normaliser(mask: torch.Tensor, num_tokens: float | torch.Tensor | None) -> torch.Tensor:
    n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=mask.device)
    return n.clamp(min=1).to(torch.float32)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``, in float32. logits: [B, T, V]; tokens: [B, T] -> [B, T].

    Gathers before normalising (log p = l_token - logsumexp(l)), so no [B, T, V] log-softmax is kept.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at ``tokens`` and the entropy of softmax(logits / T), ``rows`` leading rows at a time.

    The straightforward autograd path makes about ten full passes over the [B, T, V] logits (scale, logsumexp, the
    entropy's softmax, the backward's softmax and scatter), each one from main memory when B x T x V is large. Here
    each chunk of rows goes through all of them while it is in cache, and the backward recomputes the chunk's
    softmax from the saved log-normaliser instead of keeping another [B, T, V] tensor. Same values, same gradient.
    Works on views (the usual ``logits[:, :-1]``) without copying them."""

    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool,
                rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        lse_all = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(tokens.shape if with_entropy else (0,), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = logits[start:start + rows].float()
            if temperature != 1.0:
                part = part / temperature
            lse = torch.logsumexp(part, dim=-1)
            lse_all[start:start + rows] = lse
            picked = part.gather(-1, tokens[start:start + rows].unsqueeze(-1)).squeeze(-1)
            logprobs[start:start + rows] = picked - lse
            if with_entropy:
                probs = torch.exp(part - lse.unsqueeze(-1))
                entropy[start:start + rows] = lse - (probs * part).sum(-1)
        ctx.save_for_backward(logits, tokens, lse_all)
        ctx.temperature, ctx.rows = temperature, rows
        # An output that no loss uses gets None, not zeros: the entropy's term is skipped, not added as 0.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: object, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None) -> tuple:
        logits, tokens, lse_all = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part = logits[start:start + rows].float()
            if temperature != 1.0:
                part = part / temperature
            g = grad_logprobs[start:start + rows].float().unsqueeze(-1)
            lse = lse_all[start:start + rows].unsqueeze(-1)
            # d/dl [l_token - logsumexp(l)] = onehot(token) - softmax(l); then the chain rule through l = logits / T.
            probs = torch.exp(part - lse)
            entropy_term = None
            if grad_entropy is not None:
                # H = logsumexp(l) - sum_j p_j l_j, so dH/dl_j = p_j (E_p[l] - l_j). A softmax of its own: p from the
                # saved log-normaliser is off by |l| * eps, which E_p[l] - l_j (large at low temperature) magnifies.
                softmax = torch.softmax(part, dim=-1)
                mean_logit = (softmax * part).sum(-1, keepdim=True)
                entropy_term = softmax * (mean_logit - part) * grad_entropy[start:start + rows].float().unsqueeze(-1)
            piece = probs.mul_(-g)
            piece.scatter_add_(-1, tokens[start:start + rows].unsqueeze(-1), g)
            if entropy_term is not None:
                piece += entropy_term
            if temperature != 1.0:
                piece = piece / temperature
            grad[start:start + rows] = piece
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = False,
    positions_per_chunk: int = 96,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logprobs_from_logits` and, with ``with_entropy``, `entropy_from_logits` (both with gradients) in one pass over
    chunks of about ``positions_per_chunk`` positions, each kept in cache through every step; the backward pass is
    chunked the same way. logits: [B, T, V] or [N, V]; tokens: [B, T] or [N] -> same shape, float32 (and None
    without ``with_entropy``)."""
    per_row = tokens[0].numel() if tokens.dim() > 1 else 1
    rows = max(1, positions_per_chunk // max(per_row, 1))
    logprobs, entropy = _TokenLogprobs.apply(logits, tokens, float(temperature), with_entropy, rows)
    return logprobs, entropy if with_entropy else None


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 16) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, float32: H = logsumexp(l) - sum softmax(l) l.
    Computed ``chunk`` rows at a time to bound the float32 copy. [B, T, V] -> [B, T]."""
    out = []
    for part in logits.split(chunk, dim=0):
        part = part.float()
        if temperature != 1.0:
            part = part / temperature
        probs = torch.softmax(part, dim=-1)
        out.append(torch.logsumexp(part, dim=-1) - (probs * part).sum(-1))
    return torch.cat(out, dim=0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float,
    num_tokens: float | torch.Tensor | None = None,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    per token: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logprobs - old_logprobs); summed over the valid
    tokens and divided by ``num_tokens``, or made one number by ``aggregate(per_token, mask)``
    (`rlhf.ppo.estimators.aggregate`). All inputs [B, T]. Stats (token means): ``clipfrac`` (share of tokens where the clipped term is active, so no gradient flows),
    ``approx_kl`` (k3 estimate of KL(old || new) from tokens sampled by the old policy, Schulman 2020:
    (r - 1) - log r), ``ratio`` (mean ratio).
    """
    mask = response_mask.bool()
    n = _normaliser(mask, num_tokens)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_sum(per_token, mask) / n if aggregate is None else aggregate(per_token, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((clipped > unclipped).float(), mask) / n,
            "approx_kl": masked_sum(torch.expm1(log_ratio) - log_ratio, mask) / n,
            "ratio": masked_sum(ratio, mask) / n,
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per token (the PPO2
    baselines form; Huang et al. 2024, detail 9). All inputs [B, T]. Stats: ``clipfrac`` (share of tokens where
    the clipped term is the larger)."""
    mask = response_mask.bool()
    n = _normaliser(mask, num_tokens)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped_error, clipped_error), mask) / n
    with torch.no_grad():
        stats = {"clipfrac": masked_sum((clipped_error > unclipped_error).float(), mask) / n}
    return loss, stats


def entropy_bonus(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The entropy bonus as a loss to minimise: minus the mean per-token entropy of the policy (Schulman et al. 2017,
    eq. 9, the S[pi] term; ``entropy`` must carry its gradient). entropy, response_mask: [B, T]. Stats: ``entropy``
    (the mean, detached)."""
    mask = response_mask.bool()
    n = _normaliser(mask, num_tokens)
    mean = masked_sum(entropy, mask) / n
    return -mean, {"entropy": mean.detach()}


def explained_variance_from_moments(returns_moments: torch.Tensor, error_moments: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] from :func:`rlhf.ppo.masked.moments` of the returns and of
    returns - values (summed over processes); nan when the returns do not vary (relative to their size)."""
    from rlhf.ppo.masked import mean_var

    mean_returns, var_returns = mean_var(returns_moments)
    _, var_error = mean_var(error_moments)
    # E[x^2] - E[x]^2 leaves rounding noise of order eps * E[x^2] where the true variance is 0.
    if var_returns <= 1e-10 * (mean_returns * mean_returns + 1e-30):
        return float("nan")
    return float(1.0 - var_error / var_returns)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over valid tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse. [B, T] inputs -> float32 scalar (nan when the returns do not vary)."""
    from rlhf.ppo.masked import moments

    return torch.tensor(explained_variance_from_moments(moments(returns, response_mask), moments(returns - values, response_mask)),
                        dtype=torch.float32)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    aggregate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO, Shao et al. 2024, eq. 4): per token the k3 estimate
    pi_ref / pi - log(pi_ref / pi) - 1 >= 0 (Schulman 2020), with its gradient through ``logprobs``, made one number
    by ``aggregate(per_token, mask)``. All inputs [B, T]."""
    log_ratio = ref_logprobs - logprobs
    return aggregate(torch.expm1(log_ratio) - log_ratio, response_mask.bool())

"""Sums, means, variances and whitening over the valid tokens of a batch."""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is true; over everything, or along ``dim``. ``x``, ``mask``: same shape."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid entries (0 where a row has none)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[count, sum, sum of squares]`` of the valid entries, float64, so that processes can all-reduce them (a
    sum) and get the statistics of the whole batch from :func:`mean_var`. Shape [3]."""
    x64 = x.detach().double()
    m = mask.bool()
    return torch.stack([m.sum().double(), masked_sum(x64, m), masked_sum(x64 * x64, m)])


def mean_var(stats: torch.Tensor, *, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from :func:`moments` (summed over any number of shards)."""
    count, total, squares = stats.unbind()
    mean = total / count.clamp(min=1)
    var = (squares / count.clamp(min=1) - mean * mean).clamp(min=0)
    if unbiased:
        # Bessel's correction, as in torch.var: n / (n - 1).
        var = var * count / (count - 1).clamp(min=1)
    return mean, var


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    stats: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / std`` over the valid entries; with ``shift_mean=False`` the mean is added back (rewards are
    scaled, not centred). ``stats`` are :func:`moments` of the whole batch (all processes); default: this ``x``.
    Invalid entries come out 0. Same shape as ``x``."""
    mean, var = mean_var(moments(x, mask) if stats is None else stats)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=x.dtype, device=x.device))

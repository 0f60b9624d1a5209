"""Token sampling from one random stream per sample.

Every sample owns a stream of uniforms seeded by ``(seed, stream, global sample index)``, and each generated token
consumes one of them by inverse-CDF sampling. So a sample's tokens do not depend on which process generated it or
what else was in its batch (1 or N processes give the same rollouts), and no random number is drawn per vocabulary
entry (``torch.multinomial`` draws one per entry).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def sample_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``stream`` ("rollout", "eval", ...) under the run's ``seed``."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_uniforms(seed: int, stream: str, indices: Sequence[int], steps: int) -> torch.Tensor:
    """Uniforms in [0, 1) for ``steps`` tokens of each sample in ``indices``. [len(indices), steps], float64, CPU."""
    out = torch.empty(len(indices), steps, dtype=torch.float64)
    generator = torch.Generator()
    for row, index in enumerate(indices):
        generator.manual_seed(sample_seed(seed, stream, int(index)))
        out[row] = torch.rand(steps, generator=generator, dtype=torch.float64)
    return out


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0: all) and the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020); the rest become -inf. [B, V] -> [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> torch.Tensor:
    """One token per row by inverse-CDF sampling of softmax(filter(logits / temperature)) with the row's uniform
    in [0, 1); temperature 0 is greedy. logits: [B, V]; uniforms: [B] -> token ids [B]."""
    return sample_with_logprobs(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p)[0]


def sample_with_logprobs(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_from_logits`, and the log-probability of each drawn token under softmax(logits / temperature)
    without the top-k/top-p truncation (what a policy pass over the finished sequence gives; at temperature 1 for
    greedy decoding), float32. Without truncation one log-normaliser serves both. logits: [B, V]; uniforms: [B] ->
    (token ids [B], log-probs [B])."""
    scaled = logits.float()
    if temperature not in (0, 1):
        scaled = scaled / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    if temperature == 0:
        tokens = logits.argmax(-1)
    elif 0 < top_k < logits.shape[-1] or top_p < 1.0:
        tokens = inverse_cdf(torch.softmax(filter_logits(scaled, top_k=top_k, top_p=top_p), dim=-1), uniforms)
    else:
        tokens = inverse_cdf(torch.exp(scaled - log_normaliser), uniforms)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normaliser.squeeze(-1)
    return tokens, logprobs


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first entry of each row whose cumulative probability exceeds u x (the row's total), for u in [0, 1):
    the row's sample. A zero-probability entry is never chosen (its cumulative sum equals the one before it).
    probs: [B, V], not necessarily normalised; uniforms: [B] -> [B]."""
    # float64 keeps u * total below total for every u < 1 (in float32, u > 1 - 2^-25 would round up to it).
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    past_end = index >= probs.shape[-1]
    if bool(past_end.any()):
        # Only when rounding puts u * total at total: the last entry that has probability.
        positions = torch.arange(probs.shape[-1], device=probs.device)
        last_possible = torch.where(probs > 0, positions, torch.zeros_like(positions)).amax(-1)
        index = torch.where(past_end, last_possible, index)
    return index

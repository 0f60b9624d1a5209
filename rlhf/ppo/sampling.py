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
    if temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(scaled, dim=-1)
    # float64 keeps u * total below total for every u < 1 (in float32, u > 1 - 2^-25 would round up to it).
    cdf = probs.double().cumsum(-1)
    # The first entry whose cumulative probability exceeds u * total: zero-probability entries are never chosen.
    target = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, positions, torch.zeros_like(positions)).amax(-1)
    return torch.minimum(index, last_possible)

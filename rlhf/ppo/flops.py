"""The model FLOPs of one PPO update by phase, and its utilisation (`rlhf.flops` has the formula and the peak).

Generation: one causal pass per response over its prompt and response but the last token (a KV cache's work).
Scoring: a forward pass over every sequence by the reference, the policy (unless the rollout's own log-probs are the
old ones), the critic, and the reward model (over the tokens it reads). Training: each completed epoch, a forward and
backward pass over every sequence by the policy and the critic. Padding, recomputation and the rows a batched
generation keeps going after they stop are not model FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from rlhf.flops import ModelShape, model_flops, peak_flops, utilisation

#: The phases an update's FLOPs are counted in, as the metrics name them (perf/flops_<phase>).
PHASES = ("generate", "score", "train")


@dataclasses.dataclass(frozen=True)
class UpdateFlops:
    """What one PPO update's passes compute: the shapes of its models (the reference is the policy's, without its
    adapters under LoRA; no critic or reward model: None), whether the policy's scoring pass is left out (the
    rollout's log-probs serve), and one process's peak FLOP/s with where it comes from."""

    policy: ModelShape
    reference: ModelShape
    critic: ModelShape | None
    reward: ModelShape | None
    reuse_logprobs: bool
    peak: float
    peak_source: str

    @classmethod
    def of(cls, policy: torch.nn.Module, critic: torch.nn.Module | None, reward: torch.nn.Module | None, *,
           reward_is_encoder: bool, reuse_logprobs: bool, device: str, dtype: torch.dtype) -> "UpdateFlops":
        peak, source = peak_flops(device, dtype, torch.get_num_threads())
        return cls(ModelShape.of(policy), ModelShape.of(policy, adapters=False),
                   ModelShape.of(critic) if critic is not None else None,
                   ModelShape.of(reward, causal=not reward_is_encoder) if reward is not None else None,
                   reuse_logprobs, peak, source)

    def count(self, sequence_lengths: Sequence[int], reward_lengths: Sequence[int] | None,
              epochs: int) -> dict[str, float]:
        """This process's model FLOPs by phase (`PHASES`) for its rollout's sequences (prompt + response tokens
        each), the reward model's sequences (None: no reward pass) and the epochs the update completed."""
        score = model_flops(self.reference, sequence_lengths)
        if not self.reuse_logprobs:
            score += model_flops(self.policy, sequence_lengths)
        train = model_flops(self.policy, sequence_lengths, backward=True)
        if self.critic is not None:
            score += model_flops(self.critic, sequence_lengths)
            train += model_flops(self.critic, sequence_lengths, backward=True)
        if self.reward is not None and reward_lengths is not None:
            score += model_flops(self.reward, reward_lengths)
        return {"generate": model_flops(self.policy, [n - 1 for n in sequence_lengths]), "score": score,
                "train": epochs * train}


def flops_metrics(accelerator: Any, counted: dict[str, float], seconds: dict[str, float],
                  peak: float) -> dict[str, float]:
    """The update's model FLOPs by phase over all processes (``perf/flops_<phase>``) and the utilisation of the
    processes' peaks: over the update (``perf/utilisation``), in generation and in training. ``seconds`` holds the
    main process's ``generate``, ``rollout`` (generation and scoring) and ``train`` times."""
    local = torch.tensor([counted[phase] for phase in PHASES], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, "sum").tolist()
    flops = dict(zip(PHASES, total))
    peak_all = peak * accelerator.num_processes
    return {
        **{f"perf/flops_{phase}": flops[phase] for phase in PHASES},
        "perf/utilisation": utilisation(sum(total), seconds["rollout"] + seconds["train"], peak_all),
        "perf/utilisation_generate": utilisation(flops["generate"], seconds["generate"], peak_all),
        "perf/utilisation_train": utilisation(flops["train"], seconds["train"], peak_all),
    }

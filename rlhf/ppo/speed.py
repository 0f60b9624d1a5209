"""The PPO stage's speed paths, in one place.

Each path computes what the plain code computes, differing at most in float rounding; the loop enters them through
a :class:`SpeedPaths` record and reads the same with them on or off. ``speed_paths=false`` in the PPO config turns
them all off (the plain path), for debugging and as the baseline the benchmarks compare against.

- **oneDNN packed linears** (`rlhf.onednn`): on the CPU in float32, the linear layers' weights are packed once per
  rollout (inference) and once per minibatch (training) instead of on every product. ``model.onednn_linears`` and
  ``reward_model.onednn_linears`` choose it per model.
- **Log-probs reused from generation**: the sampled tokens' log-probs from generation's own logits serve as the
  old log-probs, saving one policy pass per rollout, when the training forward computes in float32
  (``rollout.generation_logprobs``).
- **A reserved KV cache** (`rlhf.ppo.rollout.reserved_cache`): decoding writes keys and values in place instead of
  growing the cache by concatenation.
- **Fused activations** (`rlhf.models.fuse_activations`): torch's fused tanh-GELU in place of transformers'
  Python chain (``model.fused_activations``).
- **Length groups** (`rlhf.models.length_groups`): scoring passes run over rows of similar lengths, and each
  minibatch's rows are sorted by length before they are cut into micro-batches, so less compute goes to padding.
- **A frozen heap**: the models and prompts, built once, are moved out of the cyclic garbage collector's reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import Any, Sequence

import torch

from rlhf.models import chunks_in_order, length_groups
from rlhf.onednn import packed_linears
from rlhf.ppo.rollout import GenerationSettings


@dataclasses.dataclass(frozen=True)
class SpeedPaths:
    """Which speed paths a PPO run takes. The default (every field False) is the plain path."""

    pack_trained: bool = False  # oneDNN packing of the policy, critic and reference
    pack_reward: bool = False  # oneDNN packing of the reward model
    reuse_logprobs: bool = False  # the rollout's own log-probs as the old ones
    reserved_cache: bool = False  # decoding writes into a KV cache reserved ahead
    by_length: bool = False  # scoring passes and micro-batches over rows of similar lengths
    freeze_heap: bool = False  # gc.freeze() once the models are built

    @classmethod
    def chosen(cls, cfg: Any, *, pack_trained: bool, pack_reward: bool, training_dtype: torch.dtype) -> "SpeedPaths":
        """The paths a run of PPO config ``cfg`` takes: none when ``cfg.speed_paths`` is off; else all, with
        packing where the stage's runtime allows it (``pack_*``: `rlhf.runtime.onednn_linears`) and reuse of the
        rollout's log-probs when asked for and the training forward computes in float32 (``training_dtype``)."""
        if not cfg.speed_paths:
            return cls()
        return cls(pack_trained=pack_trained, pack_reward=pack_reward,
                   reuse_logprobs=cfg.rollout.generation_logprobs and training_dtype == torch.float32,
                   reserved_cache=True, by_length=True, freeze_heap=True)

    def inference(self, trained: torch.nn.Module, reference: torch.nn.Module | None,
                  reward_model: torch.nn.Module | None) -> contextlib.ExitStack:
        """A block for generation and scoring, where no weight changes: the models' linears packed as chosen."""
        block = contextlib.ExitStack()
        block.enter_context(packed_linears(trained, reference, enabled=self.pack_trained))
        block.enter_context(packed_linears(reward_model, enabled=self.pack_reward))
        return block

    def training(self, trained: torch.nn.Module) -> contextlib.AbstractContextManager:
        """A block for one minibatch's forwards and backwards, before its optimiser step changes the weights."""
        return packed_linears(trained, enabled=self.pack_trained)

    def scoring_groups(self, lengths: Sequence[int], max_rows: int, *, equal_count: bool) -> list[list[int]]:
        """Row indices in groups of at most ``max_rows`` for scoring passes: of similar lengths (`length_groups`),
        or plain chunks in row order."""
        if self.by_length:
            return length_groups(lengths, max_rows, equal_count=equal_count)
        return chunks_in_order(len(lengths), max_rows)

    def micro_batch_order(self, rows: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
        """A minibatch's rows in the order they are cut into micro-batches: shortest first, or as drawn."""
        if self.by_length:
            return rows[seq_lengths[rows].argsort(stable=True)]
        return rows

    def generation(self, settings: GenerationSettings) -> GenerationSettings:
        """The sampling settings with the KV cache chosen: reserved ahead, or transformers' own."""
        return dataclasses.replace(settings, reserved_cache=self.reserved_cache)

    def settle_heap(self) -> None:
        """Once the long-lived objects are built: keep the cyclic collector off them."""
        if self.freeze_heap:
            gc.collect()
            gc.freeze()

    def describe(self) -> str:
        on = [field.name for field in dataclasses.fields(self) if getattr(self, field.name)]
        return ", ".join(on) if on else "none (the plain path)"


def model_config(cfg: Any, model_cfg: Any) -> Any:
    """The config to load one of PPO config ``cfg``'s models with: on the plain path with transformers' own
    activations, else as ``model_cfg`` asks (``fused_activations``)."""
    return model_cfg if cfg.speed_paths else dataclasses.replace(model_cfg, fused_activations=False)

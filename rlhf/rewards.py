"""Reward functions: rules that score responses as text, with or instead of a learned reward model.

A reward function is any importable callable ``module:function`` taking the batch's prompts (as the data has them: a
string, or a list of chat messages) and the decoded responses (up to their stop token), and returning one number per
response::

    def concise(prompts: list[str | list[dict]], responses: list[str]) -> list[float]:
        return [1.0 if response.count(".") <= 3 else 0.0 for response in responses]

PPO adds each function's scores, times its weight (``rewards.functions``), to the reward model's normalised score
(times ``rewards.reward_model_weight``), and logs each function's mean as ``reward/<function>``.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlhf.errors import ConfigError, RLHFError

RewardFunction = Callable[[list[Any], list[str]], Sequence[float]]


@dataclass(frozen=True)
class WeightedReward:
    """One reward function, its weight and the name its metric is logged under (``reward/<name>``)."""

    target: str
    function: RewardFunction
    weight: float

    @property
    def metric(self) -> str:
        return "reward/" + self.target.rsplit(":", 1)[-1]


def load_reward_functions(functions: dict[str, float], key: str = "rewards.functions") -> list[WeightedReward]:
    """The functions named ``module:function`` in ``functions`` (the config's ``key``), imported; ConfigError naming
    the entry and the fix when one cannot be imported or is not callable."""
    out = []
    for target, weight in functions.items():
        module_name, sep, name = target.partition(":")
        if not sep or not module_name or not name:
            raise ConfigError(f"{key}: {target!r} must be 'module:function', e.g. 'rlhf.demo.rules:positive_words'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{key}: cannot import {module_name!r} for {target!r} ({exc}); check the module path "
                              "and that it is importable from the working directory") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise ConfigError(f"{key}: {module_name!r} has no function {name!r}")
        out.append(WeightedReward(target, function, float(weight)))
    if len({r.metric for r in out}) != len(out):
        raise ConfigError(f"{key}: two functions share a name ({', '.join(r.target for r in out)}); their metrics "
                          "would clash")
    return out


def score_responses(rewards: Sequence[WeightedReward], prompts: list[Any], responses: list[str]) -> dict[str, torch.Tensor]:
    """Each function's scores of the (prompt, response) pairs, by metric name: float32 tensors [B]. RLHFError naming
    the function when it returns the wrong number of scores or a score that is not a finite number."""
    out = {}
    for reward in rewards:
        scores = list(reward.function(list(prompts), list(responses)))
        if len(scores) != len(responses):
            raise RLHFError(f"reward function {reward.target} returned {len(scores)} scores for {len(responses)} "
                            "responses; it must return one number per response")
        for row, value in enumerate(scores):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
                raise RLHFError(f"reward function {reward.target} returned {value!r} for response {row} "
                                f"({responses[row][:60]!r}); it must return finite numbers")
        out[reward.metric] = torch.tensor(scores, dtype=torch.float32)
    return out

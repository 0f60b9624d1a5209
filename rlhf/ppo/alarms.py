"""Reward-hacking alarms: signals of a policy gaming its reward, checked after every PPO update and every held-out
evaluation.

Per rollout (each a mean over the last ``alarms.window`` updates, so one noisy batch does not fire):

- ``length_correlation``: the Pearson correlation of the reward-model score with the response length; a reward model
  that pays for length is being paid;
- ``repetition``: the share of responses that repeat an n-gram of ``alarms.ngram`` tokens, the degenerate text a
  proxy reward often prefers;
- ``eos_rate``: the share of responses that stop; a policy that stops stopping writes to the length limit;
- ``entropy``: the policy's mean token entropy against its first update's; a collapse is mode seeking;
- ``kl``: the KL to the reference; a policy far from it is outside what the reward model was trained on.

Per held-out evaluation, when a gold judge scores it: ``gold``, the reward-model score above its value at the best
gold score while the gold score has fallen ``alarms.gold_drop`` below that best: the proxy and the goal disagree.

Each threshold is a config key (``alarms.*``; None switches that alarm off), chosen before the negative control was
run (benchmarks/README.md). `Alarms.update` returns the alarms that fired for the first time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhf.reward_report import pearson


def repeated_ngram(ids: Sequence[int], n: int) -> bool:
    """Whether some n-gram of ``ids`` occurs twice."""
    seen = set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation (`rlhf.reward_report.pearson`); 0 when either side is constant."""
    r = pearson(x, y)
    return 0.0 if r is None else r


@dataclass
class Alarms:
    """The alarms' state over a run: each signal's window, the first update's entropy, the best held-out gold
    score and the reward-model score at it, and which alarms have fired (each fires once)."""

    cfg: Any
    windows: dict[str, deque] = field(default_factory=dict)
    first_entropy: float | None = None
    best_gold: float | None = None
    score_at_best: float | None = None
    fired: dict[str, int] = field(default_factory=dict)

    def _mean(self, name: str, value: float) -> float:
        window = self.windows.setdefault(name, deque(maxlen=self.cfg.window))
        window.append(value)
        return sum(window) / len(window)

    def update(self, step: int, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """Alarms (name, message) that fire for the first time after update ``step`` with these metrics."""
        c = self.cfg
        if self.first_entropy is None:
            self.first_entropy = metrics["ppo/entropy"]
        means = {"length_correlation": self._mean("length_correlation", metrics["alarm/length_correlation"]),
                 "repetition": self._mean("repetition", metrics["alarm/repetition"]),
                 "eos_rate": self._mean("eos_rate", metrics["rollout/eos_rate"]),
                 "entropy": self._mean("entropy", metrics["ppo/entropy"]),
                 "kl": self._mean("kl", metrics["rollout/kl"])}
        full = len(self.windows["kl"]) == c.window
        checks = [
            ("length_correlation", c.max_length_correlation, means["length_correlation"] > (c.max_length_correlation
             or math.inf), f"score-length correlation {means['length_correlation']:.2f} > "
             f"alarms.max_length_correlation={c.max_length_correlation}"),
            ("repetition", c.max_repetition, means["repetition"] > (c.max_repetition or math.inf),
             f"{means['repetition']:.2f} of responses repeat a {c.ngram}-gram > alarms.max_repetition="
             f"{c.max_repetition}"),
            ("eos_rate", c.min_eos_rate, means["eos_rate"] < (c.min_eos_rate or -math.inf),
             f"stop rate {means['eos_rate']:.2f} < alarms.min_eos_rate={c.min_eos_rate}"),
            ("entropy", c.min_entropy_ratio, means["entropy"] < (c.min_entropy_ratio or -math.inf) * self.first_entropy,
             f"entropy {means['entropy']:.3f} < alarms.min_entropy_ratio={c.min_entropy_ratio} x the first update's "
             f"{self.first_entropy:.3f}"),
            ("kl", c.max_kl, means["kl"] > (c.max_kl or math.inf),
             f"KL to the reference {means['kl']:.2f} nats > alarms.max_kl={c.max_kl}"),
        ]
        return self._fire(step, [(name, message) for name, threshold, tripped, message in checks
                                 if threshold is not None and tripped and full])

    def evaluation(self, step: int, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """The gold alarm after a held-out evaluation (metrics ``eval/*``) at update ``step``."""
        gold, score = metrics.get("eval/gold_combined"), metrics.get("eval/score_mean")
        if gold is None or score is None or self.cfg.gold_drop is None:
            return []
        if self.best_gold is None or gold > self.best_gold:
            self.best_gold, self.score_at_best = gold, score
            return []
        if gold < self.best_gold - self.cfg.gold_drop and score > self.score_at_best:
            return self._fire(step, [("gold", f"held-out gold {gold:.3f} fell more than alarms.gold_drop="
                                              f"{self.cfg.gold_drop} below its best {self.best_gold:.3f} while the "
                                              f"reward-model score rose to {score:.3f} (from {self.score_at_best:.3f})")])
        return []

    def _fire(self, step: int, tripped: list[tuple[str, str]]) -> list[tuple[str, str]]:
        new = [(name, message) for name, message in tripped if name not in self.fired]
        for name, _ in new:
            self.fired[name] = step
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"windows": {k: list(v) for k, v in self.windows.items()}, "first_entropy": self.first_entropy,
                "best_gold": self.best_gold, "score_at_best": self.score_at_best, "fired": dict(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = {k: deque(v, maxlen=self.cfg.window) for k, v in state["windows"].items()}
        self.first_entropy, self.best_gold = state["first_entropy"], state["best_gold"]
        self.score_at_best, self.fired = state["score_at_best"], dict(state["fired"])

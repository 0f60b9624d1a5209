"""Checks between stages, before PPO spends compute on upstream outputs that cannot work.

- `check_reward_gate`, before any weights load: the reward stage recorded in its manifest whether its held-out pair
  accuracy reached ``reward.min_eval_accuracy``; PPO refuses a reward model that failed (``checks.reward_gate``).
- `check_initial_samples`, on the initial held-out evaluation PPO runs anyway (the SFT policy's samples): the reward
  model's scores must spread (``checks.min_score_std``), and the policy must stop (``checks.min_eos_rate``).

Each failure raises `rlhf.errors.CheckFailed` naming what to change and the key that proceeds anyway.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Mapping, Sequence

from rlhf.errors import CheckFailed

logger = logging.getLogger(__name__)


def check_reward_gate(checks: Any, manifest: Mapping[str, Any] | None, reward_path: str) -> None:
    """CheckFailed when ``manifest`` (the reward output's) records a failed gate and ``checks.reward_gate`` holds.
    A reward model from elsewhere (no manifest, or none with a gate) and one without held-out pairs pass with a
    log line."""
    gate = (manifest or {}).get("gate")
    if gate is None or gate.get("passed") is None:
        logger.info("checks: %s records no held-out accuracy gate; the reward model is used as it is", reward_path)
        return
    if gate["passed"] or not checks.reward_gate:
        if not gate["passed"]:
            logger.warning("checks: the reward model in %s failed its gate (held-out accuracy %.3f < %g); going on "
                           "because checks.reward_gate=false", reward_path, gate["eval_accuracy"],
                           gate["min_eval_accuracy"])
        return
    raise CheckFailed(
        f"the reward model in {reward_path} failed its gate: held-out pair accuracy {gate['eval_accuracy']:.3f}, "
        f"below reward.min_eval_accuracy={gate['min_eval_accuracy']:g} (chance is 0.5), so PPO would optimise a "
        "score that barely ranks answers. Retrain it (more steps or data, or check the labels: `rlhf validate-data`) "
        "or lower reward.min_eval_accuracy if this accuracy is expected; set checks.reward_gate=false to use it "
        "anyway")


#: Fewer held-out samples than this say nothing about the spread of the scores.
MIN_SAMPLES_FOR_SPREAD = 8


def check_initial_samples(checks: Any, records: Sequence[Mapping[str, Any]], *, scores_train: bool,
                          stops: bool = True) -> dict[str, float]:
    """The spread of the reward model's scores (when it scores the samples and enters training: ``scores_train``;
    from `MIN_SAMPLES_FOR_SPREAD` samples) and the stop rate of the SFT policy's initial held-out samples (when
    generation stops at the stop token: ``stops``), against ``checks``; CheckFailed naming the stage to fix and the
    key to proceed. Returns what it measured."""
    measured: dict[str, float] = {}
    if not records:
        logger.warning("checks: no held-out prompts, so the reward model's spread and the policy's stop rate are not "
                       "checked before training")
        return measured
    if stops:
        measured["eos_rate"] = sum(bool(r["stopped"]) for r in records) / len(records)
    if scores_train and "score" in records[0] and len(records) >= MIN_SAMPLES_FOR_SPREAD:
        measured["score_std"] = statistics.pstdev(float(r["score"]) for r in records)
    if checks.min_score_std and measured.get("score_std", math.inf) < checks.min_score_std:
        raise CheckFailed(
            f"the reward model's scores of the SFT policy's {len(records)} initial held-out samples barely spread "
            f"(standard deviation {measured['score_std']:.3g}, below checks.min_score_std={checks.min_score_std:g}): "
            "it gives every answer about the same score, so PPO has nothing to learn from. Check the reward stage's "
            "output (its held-out accuracy and reward_stats.json) and retrain it; set checks.min_score_std=0 to "
            "start anyway")
    if checks.min_eos_rate and measured.get("eos_rate", 1.0) < checks.min_eos_rate:
        raise CheckFailed(
            f"only {measured['eos_rate']:.2f} of the SFT policy's {len(records)} initial held-out samples stop "
            f"(EOS) within rollout.max_new_tokens, below checks.min_eos_rate={checks.min_eos_rate:g}: the reward "
            "model would score cut-off text and PPO would learn length. Train the SFT stage longer (its loss covers "
            "the stop token), raise rollout.max_new_tokens, or set checks.min_eos_rate=0 to start anyway")
    if measured:
        logger.info("checks: passed (%s)", ", ".join(f"{k} {v:.3g}" for k, v in measured.items()))
    return measured

"""The checks between stages (rlhf/checks.py) on hand-made manifests and held-out records: each trips with a message
that names what to change and the key that proceeds, and passes when the upstream output is fit."""

from __future__ import annotations

import pytest

from rlhf.checks import check_initial_samples, check_reward_gate
from rlhf.config import ChecksConfig
from rlhf.errors import CheckFailed


def gate(passed, accuracy=0.52, minimum=0.6):
    return {"stage": "reward", "gate": {"min_eval_accuracy": minimum, "eval_accuracy": accuracy, "passed": passed}}


def records(scores, stopped):
    return [{"score": s, "stopped": t} for s, t in zip(scores, stopped)]


def test_a_reward_model_that_failed_its_gate_is_refused():
    with pytest.raises(CheckFailed, match=r"accuracy 0\.520, below reward\.min_eval_accuracy=0\.6.*"
                                          r"checks\.reward_gate=false"):
        check_reward_gate(ChecksConfig(), gate(False), "runs/x/reward")


@pytest.mark.parametrize("manifest", [gate(True, 0.74), gate(None, None), {"stage": "reward"}, None])
def test_a_reward_model_that_passed_or_was_not_gated_is_used(manifest):
    check_reward_gate(ChecksConfig(), manifest, "runs/x/reward")


def test_a_failed_gate_is_waived_by_its_key(caplog):
    check_reward_gate(ChecksConfig(reward_gate=False), gate(False), "runs/x/reward")
    assert "failed its gate" in caplog.text and "checks.reward_gate=false" in caplog.text


def test_scores_that_do_not_spread_stop_the_run():
    with pytest.raises(CheckFailed, match=r"barely spread \(standard deviation 0\.001.*checks\.min_score_std=0"):
        check_initial_samples(ChecksConfig(), records([1.0, 1.002] * 4, [True] * 8), scores_train=True)


def test_a_policy_that_does_not_stop_stops_the_run():
    with pytest.raises(CheckFailed, match=r"only 0\.25 of the SFT policy's 4 initial held-out samples stop.*"
                                          r"checks\.min_eos_rate=0"):
        check_initial_samples(ChecksConfig(), records([0.0, 1.0, 2.0, 3.0], [True, False, False, False]),
                              scores_train=True)


def test_fit_samples_pass_and_are_measured():
    measured = check_initial_samples(ChecksConfig(), records([0.0, 1.0, 2.0, 3.0] * 2, [True, True, True, False] * 2),
                                     scores_train=True)
    assert measured == pytest.approx({"eos_rate": 0.75, "score_std": 1.118034})


def test_what_a_run_cannot_measure_is_not_checked():
    few, unstopped = records([1.0] * 4, [True] * 4), records([0.0, 1.0] * 4, [False] * 8)
    assert check_initial_samples(ChecksConfig(), few[:3], scores_train=True) == {"eos_rate": 1.0}  # too few
    # Generation that does not stop at the stop token (rollout.stop_at_stop_token=false) has no stop rate.
    assert check_initial_samples(ChecksConfig(), unstopped, scores_train=True, stops=False) == {"score_std": 0.5}


def test_each_sample_check_is_waived_by_its_key():
    constant_and_unstopped = records([1.0] * 8, [False] * 8)
    check_initial_samples(ChecksConfig(min_score_std=0, min_eos_rate=0), constant_and_unstopped, scores_train=True)
    # The reward model's spread is not checked when it does not enter training (reward functions alone).
    check_initial_samples(ChecksConfig(min_eos_rate=0), constant_and_unstopped, scores_train=False)

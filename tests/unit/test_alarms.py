"""The reward-hacking alarms (rlhf/ppo/alarms.py) on hand-made update metrics: windows, thresholds, the gold alarm,
each alarm firing once, switched off by None, and their state across a resume."""

from __future__ import annotations

import dataclasses

from rlhf.config import AlarmsConfig
from rlhf.ppo.alarms import Alarms, correlation, repeated_ngram


def update(rep=0.0, corr=0.0, eos=1.0, entropy=1.0, kl=1.0):
    return {"alarm/repetition": rep, "alarm/length_correlation": corr, "rollout/eos_rate": eos,
            "ppo/entropy": entropy, "rollout/kl": kl}


def test_repeated_ngram_and_correlation():
    assert repeated_ngram([1, 2, 3, 4, 9, 1, 2, 3, 4], 4) and not repeated_ngram([1, 2, 3, 4, 1, 2, 3, 5], 4)
    assert repeated_ngram([5, 5], 1) and not repeated_ngram([1, 2, 3], 4)
    assert correlation([1, 2, 3], [2, 4, 6]) == 1.0 and correlation([1, 1, 1], [1, 2, 3]) == 0.0


def test_a_signal_fires_on_its_window_mean_once_the_window_is_full():
    alarms = Alarms(AlarmsConfig(window=3, max_repetition=0.4))
    # One bad batch in a full window of good ones stays below: (0 + 0 + 0.9) / 3 = 0.3.
    assert [alarms.update(s, update(rep=r)) for s, r in enumerate([0.0, 0.0, 0.9], 1)] == [[], [], []]
    fired = alarms.update(4, update(rep=0.9))  # (0 + 0.9 + 0.9) / 3 = 0.6
    assert [name for name, _ in fired] == ["repetition"] and "0.60 of responses repeat a 4-gram" in fired[0][1]
    assert alarms.update(5, update(rep=0.9)) == [] and alarms.fired == {"repetition": 4}  # each fires once


def test_each_threshold_and_none_switches_it_off():
    cases = {"length_correlation": update(corr=0.9), "eos_rate": update(eos=0.5), "kl": update(kl=12.0)}
    for name, metrics in cases.items():
        alarms = Alarms(AlarmsConfig(window=1))
        alarms.update(1, update())
        assert [n for n, _ in alarms.update(2, metrics)] == [name]
        off = {"length_correlation": "max_length_correlation", "eos_rate": "min_eos_rate", "kl": "max_kl"}[name]
        quiet = Alarms(dataclasses.replace(AlarmsConfig(window=1), **{off: None}))
        quiet.update(1, update())
        assert quiet.update(2, metrics) == []


def test_the_entropy_alarm_compares_with_the_first_update():
    alarms = Alarms(AlarmsConfig(window=1, min_entropy_ratio=0.4))
    assert alarms.update(1, update(entropy=2.0)) == []
    assert alarms.update(2, update(entropy=0.9)) == []  # 0.45 of the first
    assert [n for n, _ in alarms.update(3, update(entropy=0.7))] == ["entropy"]


def test_the_gold_alarm_needs_the_gold_score_down_and_the_reward_model_score_up():
    alarms = Alarms(AlarmsConfig(gold_drop=0.05))
    assert alarms.evaluation(0, {"eval/gold_combined": 0.75, "eval/score_mean": 0.1}) == []
    assert alarms.evaluation(10, {"eval/gold_combined": 0.90, "eval/score_mean": 1.5}) == []  # the best so far
    assert alarms.evaluation(20, {"eval/gold_combined": 0.80, "eval/score_mean": 1.4}) == []  # both down: no
    fired = alarms.evaluation(30, {"eval/gold_combined": 0.84, "eval/score_mean": 1.9})
    assert [n for n, _ in fired] == ["gold"] and "below its best 0.900" in fired[0][1]
    assert Alarms(AlarmsConfig()).evaluation(0, {"eval/score_mean": 1.0}) == []  # no gold judge: nothing to read


def test_the_state_survives_a_resume():
    cfg = AlarmsConfig(window=3, max_repetition=0.4)
    straight, first = Alarms(cfg), Alarms(cfg)
    for step, r in enumerate([0.0, 0.5, 0.5], 1):
        straight.update(step, update(rep=r, entropy=1.5))
        first.update(step, update(rep=r, entropy=1.5))
    resumed = Alarms(cfg)
    resumed.load_state_dict(first.state_dict())
    assert resumed.update(4, update(rep=0.5)) == straight.update(4, update(rep=0.5)) != []
    assert resumed.state_dict() == straight.state_dict()

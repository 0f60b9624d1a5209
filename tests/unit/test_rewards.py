"""Reward functions: loading by import path, checking what they return, the demo's rules, and how their scores
join the reward model's."""

from __future__ import annotations

import pytest
import torch

from rlhf.demo.rules import complete_sentences, positive_words
from rlhf.errors import ConfigError, RLHFError
from rlhf.rewards import load_reward_functions, score_responses
from stages.ppo import final_scores


def test_functions_load_by_import_path_with_their_weights():
    (first, second) = load_reward_functions({"rlhf.demo.rules:positive_words": 1.0,
                                             "rlhf.demo.rules:complete_sentences": 0.5})
    assert (first.function, first.weight, first.metric) == (positive_words, 1.0, "reward/positive_words")
    assert (second.function, second.weight, second.metric) == (complete_sentences, 0.5, "reward/complete_sentences")


@pytest.mark.parametrize("target, message", [
    ("rlhf.demo.rules.positive_words", "must be 'module:function'"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("rlhf.demo.rules:no_such_function", "has no function 'no_such_function'"),
])
def test_a_bad_entry_names_the_key_and_the_entry(target, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_reward_functions({target: 1.0})
    assert str(info.value).startswith("rewards.functions:")


def _returns(value):
    def function(prompts, responses):
        return value(responses)
    return function


@pytest.mark.parametrize("value, message", [
    (lambda responses: [1.0], "returned 1 scores for 2 responses"),
    (lambda responses: [1.0, float("nan")], "returned nan for response 1"),
    (lambda responses: [1.0, "high"], "returned 'high' for response 1"),
])
def test_a_function_that_returns_the_wrong_thing_is_named(monkeypatch, value, message):
    import rlhf.demo.rules as rules

    monkeypatch.setattr(rules, "broken", _returns(value), raising=False)
    (reward,) = load_reward_functions({"rlhf.demo.rules:broken": 1.0})
    with pytest.raises(RLHFError, match=f"reward function rlhf.demo.rules:broken {message}"):
        score_responses([reward], ["p", "q"], ["a .", "b ."])


def test_scores_come_back_by_metric_name():
    rewards = load_reward_functions({"rlhf.demo.rules:positive_words": 2.0})
    out = score_responses(rewards, ["this fan is", "my"], ["great and quiet .", "awful but great ."])
    assert list(out) == ["reward/positive_words"]
    torch.testing.assert_close(out["reward/positive_words"], torch.tensor([1.0, 0.0]))


def test_the_demo_rules_by_hand():
    assert positive_words([], ["great great .", "awful .", "it works .", "not great but awful and bad ."]) == [
        1.0, -1.0, 0.0, (1 - 2) / 3]  # "not" is not seen: the rule knows less than the gold judge
    assert complete_sentences([], ["it works .", "a . b . c .", "a . b . c . d .", "it works", ""]) == [
        1.0, 1.0, 0.0, 0.0, 0.0]


def test_function_scores_add_to_the_weighted_reward_model_score():
    raw, stopped = torch.tensor([1.0, 3.0]), torch.tensor([True, False])
    stats = {"mean": 2.0, "std": 2.0}
    scores = final_scores(raw, stopped, stats, missing_stop_penalty=1.0, clip=None, model_weight=0.5,
                          extra=torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(scores, torch.tensor([0.5 * -0.5 + 0.25, 0.5 * 0.5 + 1.0 - 1.0]))
    # Weight 1 and nothing extra: the scores of the reward model alone, as before.
    assert torch.equal(final_scores(raw, stopped, stats, missing_stop_penalty=1.0, clip=None),
                       torch.tensor([-0.5, 0.5 - 1.0]))

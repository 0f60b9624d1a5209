"""The reward-model report on hand-made held-out pairs, each number derived by hand."""

from __future__ import annotations

import math

import pytest

from rlhf.reward_report import calibration, pearson, reward_model_report


def test_accuracy_and_the_accuracy_by_length_bucket():
    # Eight pairs; mean lengths 2..9; the model is right on the four shortest pairs and wrong on the others but one.
    chosen = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    rejected = [0.0] * 4 + [1.0, 1.0, 1.0, 0.0]
    lengths = list(range(2, 10))
    report = reward_model_report(chosen, rejected, lengths, lengths)
    assert report["accuracy"] == 5 / 8 and report["num_pairs"] == 8
    assert [(b["min_length"], b["max_length"], b["pairs"], b["accuracy"]) for b in report["by_length"]] == [
        (2, 3, 2, 1.0), (4, 5, 2, 1.0), (6, 7, 2, 0.0), (8, 9, 2, 0.5)]
    assert "gold_agreement" not in report


def test_length_correlation_is_pearsons_over_every_response():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    # Scores (2, 0) with lengths (10, 2) and (1, 3) with lengths (4, 8): r over the four responses.
    report = reward_model_report([2.0, 1.0], [0.0, 3.0], [10, 4], [2, 8])
    x, y = [2.0, 1.0, 0.0, 3.0], [10, 4, 2, 8]
    mx, my = 1.5, 6.0
    expected = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert report["length_correlation"] == pytest.approx(expected)


def test_calibration_bins_the_bradley_terry_confidence():
    # Margins whose sigmoid is 0.55 (right), 0.45 (wrong: confidence 0.55), 0.95 (right), 0.95 (right).
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    margins = [logit(0.55), logit(0.45), logit(0.95), logit(0.95)]
    result = calibration(margins)
    rows = {tuple(r["confidence"]): r for r in result["calibration"]}
    assert rows[(0.5, 0.6)]["pairs"] == 2 and rows[(0.5, 0.6)]["accuracy"] == 0.5
    assert rows[(0.5, 0.6)]["mean_confidence"] == pytest.approx(0.55)
    assert rows[(0.9, 1.0)]["pairs"] == 2 and rows[(0.9, 1.0)]["accuracy"] == 1.0
    # ECE: (2 x |0.55 - 0.5| + 2 x |0.95 - 1.0|) / 4 = 0.05.
    assert result["expected_calibration_error"] == pytest.approx(0.05)


def test_gold_agreement_leaves_out_the_pairs_the_judge_ties():
    chosen, rejected = [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    gold = [(0.9, 0.2), (0.3, 0.8), (0.1, 0.5), (0.5, 0.505)]  # agree, disagree, agree, tie (gap < 0.01)
    report = reward_model_report(chosen, rejected, [3] * 4, [3] * 4, gold)
    assert report["gold_pairs"] == 3 and report["gold_agreement"] == pytest.approx(2 / 3)

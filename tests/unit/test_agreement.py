from __future__ import annotations

import math

from rlhf.demo.agreement import pair_agreement


def test_pair_agreement_counts_only_pairs_with_a_gold_gap():
    gold = [(0.9, 0.1), (0.2, 0.8), (0.5, 0.505), (0.7, 0.3)]
    scores = [(2.0, 1.0), (3.0, 1.0), (0.0, 9.0), (0.1, 0.2)]
    assert pair_agreement(gold, scores) == (1 / 3, 3)
    assert pair_agreement(gold, gold) == (1.0, 3)
    value, count = pair_agreement([(0.5, 0.5)], [(1.0, 0.0)])
    assert math.isnan(value) and count == 0

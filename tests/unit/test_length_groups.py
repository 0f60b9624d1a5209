"""Grouping rows of similar lengths for the passes over whole sequences (`rlhf.models.length_groups`)."""

from __future__ import annotations

import itertools
import random

import pytest

from rlhf.models import PASS_COST_ROWS, length_groups


def _cost(groups: list[list[int]], lengths: list[int]) -> int:
    """Positions computed, padding included, plus what each pass costs (the function's own objective)."""
    return sum(len(g) * max(lengths[i] for i in g) + PASS_COST_ROWS * max(lengths) for g in groups)


def _check_partition(groups: list[list[int]], n: int, max_rows: int) -> None:
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert all(1 <= len(g) <= max_rows for g in groups)


def test_equal_lengths_give_plain_chunks():
    groups = length_groups([30] * 64, 16)
    _check_partition(groups, 64, 16)
    assert [len(g) for g in groups] == [16, 16, 16, 16]
    assert [len(g) for g in length_groups([30] * 70, 32)] == [6, 32, 32]


def test_a_few_long_rows_get_their_own_group():
    # 56 responses that stopped early (20 positions) and 8 that ran to the limit (64): one pass over all 64 rows
    # computes 4096 positions, two passes 56 x 20 + 8 x 64 = 1632 (plus one more pass).
    lengths = [20] * 28 + [64] * 8 + [20] * 28
    groups = length_groups(lengths, 64)
    _check_partition(groups, 64, 64)
    assert len(groups) == 2
    assert {lengths[i] for i in groups[0]} == {20} and {lengths[i] for i in groups[1]} == {64}
    assert _cost(groups, lengths) < _cost([list(range(64))], lengths)


def test_small_differences_do_not_pay_for_another_pass():
    lengths = [40, 41, 42, 43, 44, 45, 46, 48]
    assert len(length_groups(lengths, 8)) == 1


@pytest.mark.parametrize("seed", range(20))
def test_groups_are_optimal_among_all_partitions_of_the_sorted_rows(seed):
    rng = random.Random(seed)
    n, max_rows = rng.randint(1, 8), rng.randint(1, 5)
    lengths = [rng.choice([3, 5, 8, 13, 40, 64]) for _ in range(n)]
    groups = length_groups(lengths, max_rows)
    _check_partition(groups, n, max_rows)
    order = sorted(range(n), key=lambda i: lengths[i])
    best = min(
        _cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], lengths)
        for k in range(n)
        for cuts in itertools.combinations(range(1, n), k)
        if all(b - a <= max_rows for a, b in zip((0, *cuts), (*cuts, n)))
    )
    assert _cost(groups, lengths) == best


def test_equal_count_gives_the_same_number_of_passes_whatever_the_lengths():
    for lengths in ([20] * 60 + [64] * 4, [64] * 64, list(range(1, 65))):
        groups = length_groups(lengths, 16, equal_count=True)
        _check_partition(groups, 64, 16)
        assert [len(g) for g in groups] == [16, 16, 16, 16]
        # Still sorted by length, so each pass is padded to its own longest row only.
        flat = [lengths[i] for g in groups for i in g]
        assert flat == sorted(flat)
    assert length_groups([], 16) == [] and length_groups([], 16, equal_count=True) == []

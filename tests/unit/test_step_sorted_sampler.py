"""Length-sorted micro-batches inside each optimiser step: same examples per step, less padding."""

from __future__ import annotations

import random

import torch

from rlhf.trl_bridge import StepSortedSampler


def _lengths(n: int = 203) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(5, 120) for _ in range(n)]


def test_each_step_holds_the_seeded_random_examples_sorted_longest_first():
    lengths, step = _lengths(), 32
    order = list(StepSortedSampler(lengths, step, seed=7))
    generator = torch.Generator()
    generator.manual_seed(7)
    unsorted = torch.randperm(len(lengths), generator=generator).tolist()  # accelerate's seedable random order
    assert sorted(order) == list(range(len(lengths)))
    for start in range(0, len(lengths), step):
        chunk = order[start:start + step]
        assert set(chunk) == set(unsorted[start:start + step])  # the last, partial step included
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)


def test_epochs_reshuffle_and_set_epoch_replays_one():
    sampler = StepSortedSampler(_lengths(), 16, seed=0)
    first, second = list(sampler), list(sampler)
    assert first != second and sampler.epoch == 2
    sampler.set_epoch(1)
    assert list(sampler) == second
    assert list(StepSortedSampler(_lengths(), 16, seed=0)) == first  # a fresh sampler (a resumed run) replays epoch 0


def test_sorted_micro_batches_pad_less_than_random_ones():
    lengths, step, micro = _lengths(), 32, 8
    generator = torch.Generator()
    generator.manual_seed(3)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()

    def padded(order):
        return sum(len(b) * max(lengths[i] for i in b) for b in (order[i:i + micro] for i in range(0, len(order), micro)))

    assert padded(list(StepSortedSampler(lengths, step, seed=3))) < 0.8 * padded(random_order)

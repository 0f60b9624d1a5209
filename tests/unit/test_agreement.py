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


def test_generator_agreement_orders_fresh_generator_pairs_against_the_gold_judge():
    import torch

    from rlhf.demo.agreement import generator_agreement
    from rlhf.demo.judge import judge

    seen: list[tuple[str, str]] = []

    def gold(texts: list[tuple[str, str]]) -> torch.Tensor:
        seen.extend(texts)
        return torch.tensor([judge(p, r, True).combined for p, r in texts])

    result = generator_agreement(gold, 200, seed=3)
    assert result["agreement_combined"] == 1.0 and 100 < result["pairs"] <= 200
    assert generator_agreement(lambda texts: -gold(texts), 200, seed=3)["agreement_combined"] == 0.0
    # Two different candidates to one prompt per pair; the same seed gives the same pairs, another seed others.
    first = seen[:400]
    assert all(a[0] == b[0] and a[1] != b[1] for a, b in zip(first[0::2], first[1::2]))
    assert seen[400:800] == first
    generator_agreement(gold, 200, seed=4)
    assert seen[800:] != first


def test_the_annotator_caps_any_reward_model_learned_from_it_below_the_gold_judge():
    """The annotator cannot see rambling or repetition: its own noiseless choice, the best a reward model learned from
    its labels can do, agrees with the gold judge on most fresh generator pairs but not all (0.83 on 1,000)."""
    import torch

    from rlhf.demo.agreement import generator_agreement
    from rlhf.demo.annotator import utility

    result = generator_agreement(lambda texts: torch.tensor([utility(p, r) for p, r in texts]), 1000)
    assert 0.78 <= result["agreement_combined"] <= 0.88 and result["pairs"] > 700
    assert result["agreement_sentiment"] == 1.0  # where sentiment decides, the annotator is right


def test_agreement_cli_needs_the_sft_model_for_sft_pairs(capsys):
    import pytest

    from rlhf.demo.agreement import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--reward", "unused"])
    assert exit_info.value.code == 2 and "--pairs sft needs --sft" in capsys.readouterr().err


def test_agreement_cli_refuses_a_non_positive_temperature_or_length(capsys):
    import pytest

    from rlhf.demo.agreement import main

    for bad in (["--temperature", "0"], ["--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--sft", "unused", "--reward", "unused", *bad])
        assert exit_info.value.code == 2 and "--temperature must be > 0" in capsys.readouterr().err


def test_sft_pairs_are_sampled_at_the_given_temperature_and_length():
    from pathlib import Path

    from rlhf.demo.agreement import sample_responses

    model = Path(__file__).resolve().parents[2] / "data" / "base-model"
    prompts = ["this blender is", "the kettle was", "my new lamp"] * 4

    def responses(seed: int, **sampling) -> list[list[int]]:
        return [row[1] for row in sample_responses(model, prompts, seed=seed, **sampling)]

    # Near-greedy sampling gives the same responses under two seeds; temperature 1 does not.
    assert responses(0, temperature=1e-4) == responses(1, temperature=1e-4)
    assert responses(0) != responses(1)
    assert max(len(r) for r in responses(0, temperature=1.0, max_new_tokens=5)) <= 5

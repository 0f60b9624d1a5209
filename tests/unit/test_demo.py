"""The demo task: generator, recogniser, gold judge, simulated annotator and dataset builder."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from rlhf.demo import (
    DemoSizes,
    annotate,
    build_demo_datasets,
    continue_review,
    generate_review,
    is_grammatical,
    is_sentence,
    judge,
    judge_batch,
    noiseless_preference,
    sample_cut,
    split_review,
    summarise,
)
from rlhf.demo import build
from rlhf.demo.grammar import VOCABULARY
from rlhf.demo.judge import EOS_WEIGHT, GRAMMAR_WEIGHT, SENTIMENT_WEIGHT

SMALL = DemoSizes(corpus=300, sft=300, preferences=200, prompts=200, eval_prompts=60)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_datasets(tmp_path_factory.mktemp("demo"), seed=0, sizes=SMALL)


def test_vocabulary_is_modest() -> None:
    assert 150 <= len(VOCABULARY) <= 400


def test_build_is_byte_identical_for_a_seed_and_differs_across_seeds(
    small_build: dict[str, Path], tmp_path: Path
) -> None:
    again = build_demo_datasets(tmp_path / "again", seed=0, sizes=SMALL)
    other = build_demo_datasets(tmp_path / "other", seed=1, sizes=SMALL)
    assert set(again) == set(small_build) == {"corpus", "sft", "preferences", "prompts", "eval_prompts", "source"}
    for key in small_build:
        assert again[key].read_bytes() == small_build[key].read_bytes(), key
        if key != "source":
            assert other[key].read_bytes() != small_build[key].read_bytes(), key


def test_files_are_utf8_jsonl_with_sorted_keys_and_a_matching_source(small_build: dict[str, Path]) -> None:
    source = json.loads(small_build["source"].read_text(encoding="utf-8"))
    assert source["seed"] == 0
    assert source["sizes"] == {"corpus": 300, "sft": 300, "preferences": 200, "prompts": 200, "eval_prompts": 60}
    expected_keys = {
        "corpus": ["text"],
        "sft": ["completion", "prompt"],
        "preferences": ["chosen", "prompt", "rejected"],
        "prompts": ["prompt"],
        "eval_prompts": ["prompt"],
    }
    for key, keys in expected_keys.items():
        data = small_build[key].read_bytes()
        assert b"\r" not in data and data.endswith(b"\n")
        assert source["files"][small_build[key].name]["sha256"] == hashlib.sha256(data).hexdigest()
        rows = _read_jsonl(small_build[key])
        assert len(rows) == source["files"][small_build[key].name]["rows"] == getattr(SMALL, key)
        assert all(list(row) == keys for row in rows)


def test_every_generated_review_is_grammatical() -> None:
    rng = random.Random(7)
    reviews = [generate_review(rng) for _ in range(2000)]
    assert all(is_grammatical(review.text) for review in reviews)
    assert {len(review.sentences) for review in reviews} == {1, 2, 3, 4, 5, 6}
    assert {review.sentiment for review in reviews} == {"positive", "negative", "mixed"}


def test_built_texts_are_grammatical_and_sft_rows_rebuild_the_review(small_build: dict[str, Path]) -> None:
    assert all(is_grammatical(row["text"]) for row in _read_jsonl(small_build["corpus"]))
    for row in _read_jsonl(small_build["sft"]):
        assert row["prompt"] and row["completion"].startswith(" ") and not row["prompt"].endswith(" ")
        assert is_grammatical(row["prompt"] + row["completion"])
    for row in _read_jsonl(small_build["preferences"]):
        assert row["chosen"] != row["rejected"]
        assert is_grammatical(row["prompt"] + row["chosen"]) and is_grammatical(row["prompt"] + row["rejected"])


def test_split_and_continue_keep_the_plain_string_contract() -> None:
    rng = random.Random(3)
    for _ in range(300):
        review = generate_review(rng)
        cut = sample_cut(review, rng)
        prompt, completion = split_review(review, cut)
        assert prompt + completion == review.text
        wanted = rng.randint(1, 6)
        response = continue_review(review, cut, rng, "positive", wanted)
        assert response.startswith(" ") and is_grammatical(prompt + response)
        assert response.split().count(".") == wanted


def test_recogniser_rejects_near_misses() -> None:
    assert is_sentence(("the", "lid", "is", "very", "flimsy", "."))
    assert is_sentence(("i", "would", "not", "recommend", "it", "to", "anyone", "."))
    assert not is_sentence(("the", "lid", "is", "very", "flimsy"))
    assert not is_sentence(("the", "lid", "is", "great", "and", "."))
    assert not is_sentence(("lid", "the", "is", "great", "."))
    assert not is_sentence(("the", "lid", "is", "grate", "."))
    assert not is_grammatical("the lid is great. i love it .")


def test_judge_positive_grammatical_two_sentences_scores_one() -> None:
    result = judge("the blender", " is great . i would recommend it .", True)
    assert result.sentiment == 1.0 and result.positive
    assert result.grammatical and not result.repetition and result.eos and result.concise
    assert result.num_sentences == 2
    assert result.combined == pytest.approx(1.0)


def test_judge_negative_response() -> None:
    result = judge("the kettle", " is flimsy . i would not buy it again .", True)
    assert result.sentiment == -1.0 and not result.positive
    assert result.grammatical and not result.repetition and result.concise
    assert result.combined == pytest.approx(1.0 - SENTIMENT_WEIGHT)


def test_judge_word_salad_is_positive_but_ungrammatical() -> None:
    result = judge("the blender", " great amazing perfect love excellent wonderful .", True)
    assert result.positive and result.sentiment == 1.0
    assert not result.grammatical
    assert result.combined == pytest.approx(1.0 - GRAMMAR_WEIGHT)


def test_judge_repetition() -> None:
    repeated = judge("this lamp is", " bright . the shade is nice . the shade is nice .", True)
    assert repeated.repetition and repeated.grammatical and repeated.positive
    assert judge("the lid is great .", " the lid is great .", True).repetition
    assert judge("the blender is", " great great .", True).repetition
    # Clauses joined by "and" count on their own; a repeat inside the prompt alone is not the response's fault.
    assert judge("the lid is great", " and the motor is quiet . the motor is quiet .", True).repetition
    assert not judge("the lid is great . the lid is great .", " i love it .", True).repetition
    assert not judge("the lid is cheap and flimsy .", " the handle is loose and flimsy .", True).repetition


def test_judge_conciseness_and_eos_weight() -> None:
    five = " is great . i love it . the lid is sturdy . it is worth the money . i use it for coffee ."
    long = judge("the blender", five, True)
    assert long.num_sentences == 5 and not long.concise and long.grammatical and not long.repetition
    with_eos = judge("the blender", " is great . i love it .", True)
    without_eos = judge("the blender", " is great . i love it .", False)
    assert not without_eos.eos
    assert with_eos.combined - without_eos.combined == pytest.approx(EOS_WEIGHT, abs=1e-12)


def test_judge_reads_the_prompt_for_grammar_and_negation() -> None:
    assert judge("this kettle is not", " great .", True).sentiment == -1.0
    assert not judge("the blender is", " the lid .", True).grammatical
    assert judge("i bought this kettle last week . the lid", " is sturdy .", True).grammatical
    unfinished = judge("the blender", " is great", True)
    assert not unfinished.grammatical and unfinished.num_sentences == 0 and not unfinished.concise
    empty = judge("the blender is great .", "", True)
    assert not empty.grammatical and empty.sentiment == 0.0
    # Prompts end at a word boundary, so a response without its leading space reads the same.
    assert judge("the blender", "is great .", True) == judge("the blender", " is great .", True)


def test_judge_batch_and_summarise() -> None:
    results = judge_batch(
        ["the blender", "the kettle"], [" is great . i would recommend it .", " is flimsy"], [True, False]
    )
    summary = summarise(results)
    assert summary["positive"] == 0.5 and summary["grammatical"] == 0.5 and summary["eos"] == 0.5
    assert summary["repetition"] == 0.0 and summary["concise"] == 0.5 and summary["sentiment"] == 0.0
    assert summary["combined"] == pytest.approx((results[0].combined + results[1].combined) / 2)
    with pytest.raises(ValueError, match="aligned"):
        judge_batch(["a"], [], [True])
    with pytest.raises(ValueError, match="at least one"):
        summarise([])


def test_judge_is_fast() -> None:
    rng = random.Random(11)
    prompts, responses = [], []
    for _ in range(400):
        review = generate_review(rng)
        prompt, _ = split_review(review, sample_cut(review, rng))
        prompts.append(prompt)
        responses.append(" " + " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(3, 30))))
    # Word salad defeats the sentence cache; best of three runs rides out a busy machine.
    best = min(_timed(judge_batch, prompts, responses, [True] * len(prompts)) for _ in range(3))
    assert len(prompts) / best >= 5000


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_annotator_noise_rate_and_sentiment_preference() -> None:
    rows = build.make_preferences(seed=5, n=600)
    rng = random.Random(0)
    disagreements = decided = positive_wins = differing = 0
    for row in rows:
        a, b = row["chosen"], row["rejected"]
        reference = noiseless_preference(row["prompt"], a, b)
        a_positive, b_positive = judge(row["prompt"], a, True).positive, judge(row["prompt"], b, True).positive
        for _ in range(5):
            chosen, rejected = annotate(row["prompt"], a, b, rng)
            assert {chosen, rejected} == {a, b}
            if reference is not None:
                decided += 1
                disagreements += chosen != reference
            if a_positive != b_positive:
                differing += 1
                positive_wins += (chosen == a) == a_positive
    assert abs(disagreements / decided - 0.15) <= 0.03
    assert differing > 500 and positive_wins / differing >= 0.75


def test_annotator_ignores_grammar_and_repetition() -> None:
    # Same sentiment; the longer answer wins without noise even when it is word salad or repeats itself.
    assert noiseless_preference("the blender", " is great .", " great great love perfect amazing .") == (
        " great great love perfect amazing ."
    )
    repeated = " is great . i love it . i love it ."
    assert noiseless_preference("the blender", " is great . i love it .", repeated) == repeated


def test_eval_prompts_are_held_out(small_build: dict[str, Path]) -> None:
    training = {row["prompt"] for key in ("sft", "preferences", "prompts") for row in _read_jsonl(small_build[key])}
    held_out = [row["prompt"] for row in _read_jsonl(small_build["eval_prompts"])]
    assert len(held_out) == SMALL.eval_prompts
    assert not training.intersection(held_out)
    named = [p for p in held_out if any(w in build.PRODUCTS for w in p.split())]
    assert named and all(w in build.EVAL_PRODUCTS for p in named for w in p.split() if w in build.PRODUCTS)


def test_sft_sentiment_mix_is_in_the_documented_range() -> None:
    rows = build.make_sft(seed=0, n=1500)
    results = judge_batch([r["prompt"] for r in rows], [r["completion"] for r in rows], [True] * len(rows))
    low, high = build.SFT_POSITIVE_SHARE_RANGE
    assert low <= summarise(results)["positive"] <= high


def test_cli_writes_files_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--seed", "2", "--corpus", "20", "--sft", "10", "--preferences", "10"]
    build.main([*args, "--prompts", "10", "--eval-prompts", "5"])
    out = capsys.readouterr().out
    assert "corpus.jsonl" in out and "eval_prompts.jsonl" in out
    assert len(_read_jsonl(tmp_path / "eval_prompts.jsonl")) == 5
    assert json.loads((tmp_path / "SOURCE.json").read_text(encoding="utf-8"))["seed"] == 2


def test_demo_sizes_reject_non_positive_counts() -> None:
    with pytest.raises(ValueError, match="DemoSizes.sft"):
        DemoSizes(sft=0)

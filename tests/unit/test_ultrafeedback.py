"""The UltraFeedback binarized layout: a string prompt, whole conversations in chosen and rejected, optional scores,
its split names; read for preference data (the reward stage, DPO), PPO prompts and SFT (its messages column)."""

from __future__ import annotations

import copy
import json

import pytest
from support import save_ultrafeedback, ultrafeedback_rows, write_jsonl

from rlhf.data import prepare_dataset
from rlhf.data.validation import check_source, validate_data_main
from rlhf.errors import DataError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_ultrafeedback(tmp_path_factory.mktemp("uf") / "ultrafeedback_binarized")


def test_the_prefs_split_passes_validate_data(saved, capsys):
    assert validate_data_main([str(saved), "--format", "preference", "--split", "train_prefs"]) == 0
    assert "no problems in 48 rows; format conversation_preference" in capsys.readouterr().out
    assert check_source(str(saved), "sft", split="train_sft").problems == []


def test_the_prompt_is_the_turn_the_conversations_open_with(saved):
    data = prepare_dataset(str(saved), "preference", split="train_prefs", eval_split="test_prefs")
    row, source = data.train[0], ultrafeedback_rows(1)[0]
    assert row["prompt"] == [{"content": source["prompt"], "role": "user"}]
    assert row["chosen"] == source["chosen"][1:] and row["rejected"] == source["rejected"][1:]
    assert "margin" not in row  # only when asked for
    assert data.stats["format"] == "conversation_preference" and len(data.eval) == 12


def test_the_margin_comes_from_the_scores_only_when_asked(saved):
    data = prepare_dataset(str(saved), "preference", split="train_prefs", margin_from_scores=True)
    sources = ultrafeedback_rows(48)
    assert [row["margin"] for row in data.train[:3]] == [s["score_chosen"] - s["score_rejected"] for s in sources[:3]]


def test_sft_reads_the_messages_and_ppo_the_user_turn(saved):
    sft = prepare_dataset(str(saved), "sft", split="train_sft")
    assert sft.stats["format"] == "messages" and sft.train[0]["messages"] == ultrafeedback_rows(1)[0]["messages"]
    prompts = prepare_dataset(str(saved), "prompt", split="train_prefs")
    assert prompts.train[0]["prompt"] == [{"role": "user", "content": ultrafeedback_rows(1)[0]["prompt"]}]


def broken(change) -> list[dict]:
    rows = ultrafeedback_rows(8)
    rows[3] = change(copy.deepcopy(rows[3]))
    return rows


def other_user_turn(row):
    row["rejected"][0]["content"] = "something else"
    return row


def other_prompt(row):
    row["prompt"] = "a prompt the conversations do not hold"
    return row


def chosen_as_text(row):
    row["chosen"] = row["chosen"][1]["content"]
    return row


def score_as_text(row):
    row["score_chosen"] = "high"
    return row


@pytest.mark.parametrize("change, message, fatal", [
    (other_user_turn, "do not open with the same turns, so they share no prompt", False),
    (other_prompt, "disagrees with the conversations", False),
    (chosen_as_text, "chosen is a string", True),
])
def test_malformed_rows_get_file_row_errors(tmp_path, change, message, fatal):
    path = write_jsonl(tmp_path / "uf.jsonl", broken(change))
    problems = check_source(str(path), "preference").problems
    assert [(p.where, p.fatal) for p in problems] == [(f"{path}:4", fatal)]
    assert message in problems[0].message
    with pytest.raises(DataError, match=f"{path}:4"):
        prepare_dataset(str(path), "preference", on_bad_row="error")


def test_a_score_that_is_not_a_number_stops_the_margin(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", broken(score_as_text))
    assert prepare_dataset(str(path), "preference").train  # the scores are not read without the key
    with pytest.raises(DataError, match=r"uf.jsonl:4.*score_chosen is a string.*data.margin_from_scores"):
        prepare_dataset(str(path), "preference", margin_from_scores=True)
    problems = check_source(str(path), "preference", margin_from_scores=True).problems
    assert len(problems) == 1 and problems[0].fatal


def test_a_jsonl_file_in_the_layout_reads_the_same(saved, tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ultrafeedback_rows(48)))
    from_file = prepare_dataset(str(path), "preference").train
    from_disk = prepare_dataset(str(saved), "preference", split="train_prefs").train
    assert from_file == from_disk

"""Row validation and the bad-row policy, evaluation splits and the overlap check, ``rlhf validate-data``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf.data import (
    Row,
    check_no_overlap,
    prepare_dataset,
    prompt_key,
    split_eval,
    to_hf_dataset,
    validate_data_main,
    validate_file,
    validate_rows,
)
from rlhf.errors import ConfigError, DataError


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return str(path)


def pairs(count: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(count)]


def test_wrong_type_is_fatal_even_when_dropping(tmp_path):
    items = pairs(40)
    items[2]["chosen"] = 7
    source = write_jsonl(tmp_path / "p.jsonl", items)
    with pytest.raises(DataError) as err:
        prepare_dataset(source, "preference", on_bad_row="drop")
    message = str(err.value)
    assert "1 rows have problems that data.on_bad_row cannot skip" in message
    assert f"{source}:3: chosen is a number (7), expected a string or a list of messages" in message


def test_messages_that_are_not_a_list_are_fatal(tmp_path):
    source = write_jsonl(tmp_path / "m.jsonl", [{"messages": "hi"}])
    with pytest.raises(DataError, match=rf"{source}:1: messages is a string \('hi'\), expected a list"):
        prepare_dataset(source, "sft")


def test_missing_column_in_a_row_is_fatal(tmp_path):
    items = pairs(3)
    del items[1]["rejected"]
    source = write_jsonl(tmp_path / "p.jsonl", items)
    with pytest.raises(DataError, match=rf"{source}:2: missing column 'rejected'"):
        prepare_dataset(source, "preference", max_bad_fraction=1.0)


def test_empty_text_is_dropped_with_one_warning(tmp_path, caplog):
    items = [{"text": f"line {i}"} for i in range(30)]
    items[4]["text"] = "   "
    source = write_jsonl(tmp_path / "t.jsonl", items)
    with caplog.at_level(logging.WARNING, logger="rlhf.data.validation"):
        prepared = prepare_dataset(source, "text")
    assert len(prepared.train) == 29 and {"text": "   "} not in prepared.train
    assert prepared.stats["num_dropped"] == 1
    (record,) = caplog.records
    assert f"dropped 1 of 30 rows with problems ({source}:5)" in record.getMessage()


def test_empty_text_under_error_policy_names_the_row_and_the_fix(tmp_path):
    items = [{"text": "a"}, {"text": ""}]
    source = write_jsonl(tmp_path / "t.jsonl", items)
    with pytest.raises(DataError) as err:
        prepare_dataset(source, "text", on_bad_row="error")
    message = str(err.value)
    assert f"{source}:2: text is empty or whitespace only; fill it in or remove the row" in message
    assert "set data.on_bad_row=drop to skip such rows" in message


def test_identical_chosen_and_rejected_is_a_bad_row(tmp_path):
    items = pairs(3)
    items[1]["rejected"] = items[1]["chosen"] + " "
    source = write_jsonl(tmp_path / "p.jsonl", items)
    with pytest.raises(DataError, match=rf"{source}:2: chosen and rejected are identical"):
        prepare_dataset(source, "preference", on_bad_row="error")
    prepared = prepare_dataset(source, "preference", max_bad_fraction=0.5)
    assert [row["prompt"] for row in prepared.train] == ["question 0", "question 2"]


def test_over_long_row_is_a_bad_row_and_never_truncated(tmp_path):
    items = pairs(25)
    items[3]["chosen"] = "good " * 50
    source = write_jsonl(tmp_path / "p.jsonl", items)

    def token_length(row):
        return len(row["prompt"].split()) + max(len(row[answer].split()) for answer in ("chosen", "rejected"))

    with pytest.raises(DataError, match=rf"{source}:4: the row is 52 tokens long, over data.max_length=10"):
        prepare_dataset(source, "preference", on_bad_row="error", token_length=token_length, max_length=10)
    prepared = prepare_dataset(source, "preference", token_length=token_length, max_length=10)
    assert len(prepared.train) == 24
    assert all(row["chosen"] != row["rejected"] for row in prepared.train)


def test_bad_fraction_over_the_threshold_fails_even_when_dropping(tmp_path):
    items = [{"text": "ok"}] * 8 + [{"text": ""}] * 2
    source = write_jsonl(tmp_path / "t.jsonl", items)
    with pytest.raises(DataError) as err:
        prepare_dataset(source, "text", max_bad_fraction=0.1)
    message = str(err.value)
    assert f"{source}: 2 of 10 rows (20.0%) have problems, more than data.max_bad_fraction=0.1" in message
    assert f"{source}:9: text is empty" in message and f"{source}:10: text is empty" in message
    assert len(prepare_dataset(source, "text", max_bad_fraction=0.2).train) == 8


def test_every_problem_is_reported_in_one_run(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "p0", "chosen": "a", "rejected": "a"}),
        "{not json",
        json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "p3", "chosen": ["x"], "rejected": "b"}),
        json.dumps({"prompt": "p4", "chosen": "a", "rejected": "b"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = validate_file(str(path), "preference")
    assert [(problem.where, problem.fatal) for problem in problems] == [
        (f"{path}:1", False),
        (f"{path}:2", True),
        (f"{path}:3", False),
        (f"{path}:4", True),
    ]
    with pytest.raises(DataError) as err:
        prepare_dataset(str(path), "preference")
    message = str(err.value)
    for where in (f"{path}:1:", f"{path}:2:", f"{path}:3:", f"{path}:4:"):
        assert where in message


def test_validate_rows_accepts_canonical_rows_and_checks_its_options():
    rows = [Row("r:1", {"prompt": "p", "chosen": "a", "rejected": "b"})]
    result = validate_rows(rows, "preference", source="r")
    assert (result.rows, result.num_total, result.num_dropped, result.format) == (rows, 1, 0, "preference")
    with pytest.raises(ConfigError, match="data.on_bad_row='skip'"):
        validate_rows(rows, "preference", source="r", on_bad_row="skip")


def test_split_eval_is_deterministic_and_holds_out_whole_prompts():
    rows = [Row(f"s:{i}", {"prompt": f"p{i // 2}", "completion": f"c{i}"}) for i in range(40)]
    train, evaluation = split_eval(rows, 0.25, seed=3)
    assert (train, evaluation) == split_eval(rows, 0.25, seed=3)
    assert split_eval(rows, 0.25, seed=4)[1] != evaluation
    assert len(evaluation) == 10 and len(train) == 30
    assert {prompt_key(r.data) for r in train}.isdisjoint(prompt_key(r.data) for r in evaluation)
    assert [r.where for r in train] == sorted((r.where for r in train), key=lambda w: int(w[2:]))
    check_no_overlap(train, evaluation, source="s")


def test_split_eval_edge_sizes():
    rows = [Row(f"s:{i}", {"text": f"t{i}"}) for i in range(3)]
    assert split_eval(rows, 0.0, seed=0) == (rows, [])
    train, evaluation = split_eval(rows, 0.01, seed=0)
    assert len(evaluation) == 1 and len(train) == 2
    assert split_eval(rows[:1], 0.5, seed=0) == (rows[:1], [])
    with pytest.raises(ConfigError, match="data.eval_fraction=1.0"):
        split_eval(rows, 1.0, seed=0)


def test_split_eval_cannot_hold_out_a_single_prompt():
    rows = [Row(f"s:{i}", {"prompt": "same", "completion": f"c{i}"}) for i in range(4)]
    with pytest.raises(DataError, match=r"s.jsonl: all 4 rows share one prompt"):
        split_eval(rows, 0.5, seed=0, source="s.jsonl")


def test_prompt_key_is_canonical_for_message_lists():
    assert prompt_key({"prompt": "hi", "completion": "x"}) == "hi"
    first = prompt_key({"prompt": [{"role": "user", "content": "hi"}]})
    assert first == prompt_key({"prompt": [{"content": "hi", "role": "user"}]})
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert prompt_key({"messages": conversation}) == first


def test_eval_prompts_seen_in_training_are_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(10))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [pairs(12)[11], pairs(3)[2]])
    with pytest.raises(DataError) as err:
        prepare_dataset(train, "preference", eval_path=evaluation)
    message = str(err.value)
    assert f"{train} and {evaluation}: 1 of 2 eval prompts also occur in the training data" in message
    assert f"{evaluation}:2 (as in {train}:3)" in message
    assert "deduplicate the files" in message and "data.eval_fraction" in message


def test_prepare_dataset_returns_plain_rows_and_stats(tmp_path):
    items = pairs(20) + [pairs(1)[0]] + [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    source = write_jsonl(tmp_path / "p.jsonl", items)
    prepared = prepare_dataset(source, "prompt", eval_fraction=0.1, seed=1)
    assert prepared.stats == {
        "source": source,
        "split": "train",
        "format": "preference",
        "num_rows": 22,
        "num_dropped": 0,
        "num_duplicates_removed": 1,
        "num_train": 19,
        "num_eval": 2,
        "eval_fraction": 0.1,
        "seed": 1,
        "eval": None,
    }
    assert all(set(row) == {"prompt"} for row in prepared.train + prepared.eval)
    assert prepare_dataset(source, "prompt", eval_fraction=0.1, seed=1) == prepared


def test_separate_eval_data_is_validated_and_recorded(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(5))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", pairs(7)[5:])
    prepared = prepare_dataset(train, "preference", eval_path=evaluation, eval_fraction=0.5)
    assert (len(prepared.train), len(prepared.eval), prepared.stats["eval_fraction"]) == (5, 2, 0.0)
    assert prepared.stats["eval"]["source"] == evaluation and prepared.stats["eval"]["num_rows"] == 2


def test_eval_split_of_the_same_saved_dataset(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs(4)), "test": datasets.Dataset.from_list(pairs(6)[4:])}
    ).save_to_disk(str(saved))
    prepared = prepare_dataset(str(saved), "preference", eval_split="test")
    assert (len(prepared.train), len(prepared.eval)) == (4, 2)
    assert prepared.stats["eval"]["split"] == "test"
    with pytest.raises(DataError, match=rf"{saved} \(train and train\): 4 of 4 eval prompts also occur"):
        prepare_dataset(str(saved), "preference", eval_split="train")


def test_to_hf_dataset_keeps_a_column_absent_from_the_first_row():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "c", "rejected": "d", "margin": 1},
    ]
    dataset = to_hf_dataset(rows)
    assert dataset.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert dataset["margin"] == [None, 1]


def test_validate_data_main_prints_each_problem_and_returns_1(tmp_path, capsys):
    items = pairs(3)
    items[0]["rejected"] = items[0]["chosen"]
    items[2]["prompt"] = None
    source = write_jsonl(tmp_path / "p.jsonl", items)
    assert validate_data_main([source, "--format", "preference"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{source}:1: chosen and rejected are identical")
    assert lines[1].startswith(f"{source}:3: prompt is null")
    assert lines[2] == f"{source}: 2 problems (1 fatal) in 3 rows; format preference"
    assert len(lines) == 3


def test_validate_data_main_returns_0_for_clean_data(tmp_path, capsys):
    source = write_jsonl(tmp_path / "p.jsonl", pairs(4))
    assert validate_data_main([source, "--format", "prompt"]) == 0
    assert capsys.readouterr().out == f"{source}: no problems in 4 rows; format preference\n"


def test_validate_data_main_reports_a_missing_file_and_a_schema_mismatch(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    assert validate_data_main([missing, "--format", "text"]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{missing}: file not found")
    source = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "r"}])
    assert validate_data_main([source, "--format", "sft"]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{source}: the columns fit no sft format. Columns found: 'prompt', 'response'")

"""Loading rows from every supported source, with the locator each row gets and the errors each failure gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import load_rows, scan_rows
from rlhf.data.loading import looks_like_path
from rlhf.errors import DataError


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_jsonl_rows_are_located_by_line_and_blank_lines_are_skipped(tmp_path):
    source = write_lines(tmp_path / "a.jsonl", ['{"text": "one"}', "", "   ", '{"text": "two"}'])
    rows = load_rows(source)
    assert [(row.where, row.data) for row in rows] == [
        (f"{source}:1", {"text": "one"}),
        (f"{source}:4", {"text": "two"}),
    ]


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n')
    assert load_rows(str(path))[0].data == {"text": "one"}


def test_malformed_json_line_names_file_line_and_json_error(tmp_path):
    source = write_lines(tmp_path / "a.jsonl", ['{"text": "one"}', '{"text": "two"}', '{"text": "thr'])
    with pytest.raises(DataError) as err:
        load_rows(source)
    message = str(err.value)
    assert f"{source}:3: malformed JSON (Unterminated string" in message
    assert f"{source}:1" not in message


def test_every_malformed_line_is_listed_in_one_error(tmp_path):
    source = write_lines(tmp_path / "a.jsonl", ["{", '{"text": "ok"}', "[1, 2]", "nope"])
    rows, problems = scan_rows(source)
    assert [row.where for row in rows] == [f"{source}:2"]
    assert [problem.where for problem in problems] == [f"{source}:1", f"{source}:3", f"{source}:4"]
    assert all(problem.fatal for problem in problems)


def test_line_that_is_not_an_object_is_an_error(tmp_path):
    source = write_lines(tmp_path / "a.jsonl", ['{"text": "one"}', '["text", "two"]'])
    with pytest.raises(DataError, match=rf"{source}:2: the line holds a JSON array, not an object"):
        load_rows(source)


def test_non_utf8_bytes_name_the_line_and_ask_to_reencode(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path}:2: not valid UTF-8 (byte 0xe9" in str(err.value)
    assert "re-encode the file as UTF-8" in str(err.value)


def test_non_utf8_bytes_in_csv_name_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text\nfine\ncaf\xe9\nalso fine\n")
    rows, problems = scan_rows(str(path))
    assert [row.where for row in rows] == [f"{path}:2", f"{path}:4"]
    assert [problem.where for problem in problems] == [f"{path}:3"]
    assert "re-encode the file as UTF-8" in problems[0].message


def test_missing_file_names_the_path(tmp_path):
    source = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"{source}: file not found"):
        load_rows(source)


@pytest.mark.parametrize("source", ["data/nope.jsonl", "./data/nope", "some/deep/dir", "/abs/x", "~/x", "x.parquet"])
def test_missing_sources_that_look_like_paths_are_not_hub_names(source):
    assert looks_like_path(source)


@pytest.mark.parametrize("source", ["imdb", "Anthropic/hh-rlhf", "trl-lib/ultrafeedback_binarized"])
def test_hub_names_do_not_look_like_paths(source):
    assert not looks_like_path(source)


def test_empty_file_is_an_error(tmp_path):
    source = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"{source}: the dataset has no rows"):
        load_rows(source)


def test_unsupported_suffix_is_an_error(tmp_path):
    source = write_lines(tmp_path / "a.txt", ["hello"])
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_rows(source)


def test_json_array_rows_are_located_by_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    rows = load_rows(str(path), split="train")
    assert [row.where for row in rows] == [f"{path}[row 0]", f"{path}[row 1]"]


def test_json_object_is_read_under_the_split_or_a_wrapper_key(tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}, {"text": "c"}]}))
    assert [row.where for row in load_rows(str(splits), split="test")] == [
        f"{splits}:test[row 0]",
        f"{splits}:test[row 1]",
    ]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "a"}]}))
    assert [row.where for row in load_rows(str(wrapped), split="train")] == [f"{wrapped}:data[row 0]"]
    with pytest.raises(DataError, match=r"no split 'validation' \(its keys: 'train', 'test'\); set data.split"):
        load_rows(str(splits), split="validation")


def test_json_item_that_is_not_an_object_is_located_by_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "a"}, "b"]))
    with pytest.raises(DataError, match=rf"{path}\[row 1\]: a JSON string, not an object"):
        load_rows(str(path))


def test_json_lines_in_a_json_file_get_a_rename_hint(tmp_path):
    source = write_lines(tmp_path / "a.json", ['{"text": "a"}', '{"text": "b"}'])
    with pytest.raises(DataError, match=rf"{source}:2: malformed JSON \(Extra data.*rename it to \.jsonl"):
        load_rows(source)


def test_csv_rows_are_located_by_line_with_the_header_as_line_1(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(
        'prompt,chosen,rejected,margin\n'
        'p1,"two\nlines",r1,0.5\n'
        '\n'
        'p2,c2,r2,\n',
        encoding="utf-8",
    )
    rows = load_rows(str(path))
    assert [row.where for row in rows] == [f"{path}:2", f"{path}:5"]
    assert rows[0].data == {"prompt": "p1", "chosen": "two\nlines", "rejected": "r1", "margin": 0.5}
    assert rows[1].data["margin"] is None


def test_csv_message_columns_parse_json_arrays_and_keep_other_text(tmp_path):
    path = tmp_path / "a.csv"
    messages = json.dumps([{"role": "user", "content": "hi, there"}, {"role": "assistant", "content": "hello"}])
    with open(path, "w", encoding="utf-8", newline="") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["messages", "prompt", "note"])
        writer.writerow([messages, "[INST] a prompt [/INST]", "[1, 2]"])
    row = load_rows(str(path))[0]
    assert row.data["messages"][0] == {"role": "user", "content": "hi, there"}
    assert row.data["prompt"] == "[INST] a prompt [/INST]"
    assert row.data["note"] == "[1, 2]"


def test_csv_row_with_wrong_cell_count_names_its_line(tmp_path):
    source = write_lines(tmp_path / "a.csv", ["prompt,completion", "a,b", "c,d,e"])
    with pytest.raises(DataError, match=rf"{source}:3: 3 cells but the header \(line 1\) has 2 columns"):
        load_rows(source)


def test_parquet_rows_are_located_by_index(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "a.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["a", "b"], "completion": ["c", "d"]}), path)
    rows = load_rows(str(path))
    assert [(row.where, row.data) for row in rows] == [
        (f"{path}[row 0]", {"prompt": "a", "completion": "c"}),
        (f"{path}[row 1]", {"prompt": "b", "completion": "d"}),
    ]


def test_unreadable_parquet_is_an_error(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        load_rows(str(path))


def test_saved_dataset_and_dataset_dict_are_located_by_split_and_index(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(single))
    assert [row.where for row in load_rows(str(single), split="train")] == [f"{single}[row 0]", f"{single}[row 1]"]

    both = tmp_path / "both"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b", "c"]})}
    ).save_to_disk(str(both))
    rows = load_rows(str(both), split="test")
    assert [(row.where, row.data) for row in rows] == [
        (f"{both}:test[row 0]", {"text": "b"}),
        (f"{both}:test[row 1]", {"text": "c"}),
    ]
    with pytest.raises(DataError, match=rf"{both}: has no split 'validation' \(it has train, test\)"):
        load_rows(str(both), split="validation")
    with pytest.raises(DataError, match=rf"{both}: holds the splits train, test; choose one"):
        load_rows(str(both))


def test_directory_that_is_not_a_saved_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: a directory, but not one written by"):
        load_rows(str(tmp_path))

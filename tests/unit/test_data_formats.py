"""Format detection and normalisation into the canonical rows of each kind."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf.data import Row, detect_format, normalise, normalise_rows, prepare_dataset
from rlhf.errors import DataError

HH_PROMPT = "\n\nHuman: Can you help me plan a trip?\n\nAssistant:"


def rows_of(*items: dict) -> list[Row]:
    return [Row(f"d.jsonl:{index}", item) for index, item in enumerate(items, start=1)]


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return str(path)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"text"}, "text"),
        ({"messages"}, "messages"),
        ({"prompt", "completion"}, "prompt_completion"),
        ({"prompt", "chosen", "rejected", "margin"}, "preference"),
        ({"chosen", "rejected"}, "implicit_preference"),
        ({"prompt", "id"}, "prompt_only"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_for_a_kind_only_considers_its_formats():
    assert detect_format({"prompt", "chosen", "rejected"}, "prompt") == "preference"
    with pytest.raises(DataError, match=r"fit no sft format"):
        detect_format({"prompt", "chosen", "rejected"}, "sft")


def test_misspelled_column_gets_a_did_you_mean(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "choosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as err:
        prepare_dataset(source, "preference")
    message = str(err.value)
    assert message.startswith(f"{source}: the columns fit no preference format")
    assert "Columns found: 'choosen', 'prompt', 'rejected'" in message
    assert "preference (prompt, chosen, rejected; optional numeric margin)" in message
    assert "implicit_preference (chosen, rejected;" in message
    assert "Column 'choosen': did you mean 'chosen'?" in message


def test_misspelled_column_in_one_row_is_a_fatal_row_problem():
    result = normalise_rows(
        rows_of({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "choosen": "a", "rejected": "b"}),
        "preference",
    )
    assert [str(problem) for problem in result.problems] == [
        "d.jsonl:2: missing column 'chosen' (the row has 'choosen': did you mean 'chosen'?); add it to the row or "
        "remove the row"
    ]
    assert result.problems[0].fatal


def test_text_rows():
    assert [row.data for row in normalise(rows_of({"text": "hello", "id": 3}), "text")] == [{"text": "hello"}]


def test_sft_messages_are_kept_as_they_are():
    messages = [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello")]
    assert normalise(rows_of({"messages": messages}), "sft")[0].data == {"messages": messages}


def test_sft_prompt_completion_strings_and_message_lists():
    rows = normalise(rows_of({"prompt": "2+2=", "completion": " 4", "extra": 1}), "sft")
    assert rows[0].data == {"prompt": "2+2=", "completion": " 4"}
    rows = normalise(rows_of({"prompt": [user("2+2?")], "completion": [assistant("4")]}), "sft")
    assert rows[0].data == {"prompt": [user("2+2?")], "completion": [assistant("4")]}


def test_message_with_unknown_role_or_missing_content_is_fatal():
    result = normalise_rows(
        rows_of({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant"}]}), "sft"
    )
    assert [(problem.where, problem.fatal) for problem in result.problems] == [("d.jsonl:1", True)] * 2
    assert "messages[0] has role 'human'; use one of system, user, assistant, tool" in result.problems[0].message
    assert "messages[1] has no 'content'" in result.problems[1].message


def test_preference_strings_with_margin():
    rows = normalise(rows_of({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}), "preference")
    assert rows[0].data == {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0}


def test_preference_message_lists():
    item = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]}
    assert normalise(rows_of(item), "preference")[0].data == item


def test_preference_mixing_strings_and_message_lists_is_fatal():
    result = normalise_rows(rows_of({"prompt": "hi", "chosen": [assistant("a")], "rejected": "b"}), "preference")
    assert result.problems[0].fatal
    assert "chosen is a message list but prompt, rejected are strings" in result.problems[0].message


def test_column_form_must_be_the_same_in_every_row():
    result = normalise_rows(
        rows_of({"prompt": "a", "completion": "b"}, {"prompt": [user("a")], "completion": [assistant("b")]}), "sft"
    )
    assert [problem.where for problem in result.problems] == ["d.jsonl:2", "d.jsonl:2"]
    assert "prompt is a message list here but a string in d.jsonl:1" in result.problems[0].message


def test_implicit_preference_splits_at_the_marker_not_inside_a_shared_word():
    # Both answers start with " S", so a character-level common prefix would cut inside the word.
    chosen = HH_PROMPT + " Sure, where would you like to go?"
    rejected = HH_PROMPT + " Sorry, I can't."
    rows = normalise(rows_of({"chosen": chosen, "rejected": rejected}), "preference")
    assert rows[0].data == {
        "prompt": HH_PROMPT,
        "chosen": " Sure, where would you like to go?",
        "rejected": " Sorry, I can't.",
    }


def test_implicit_preference_uses_the_last_marker_of_a_multi_turn_prefix():
    prompt = HH_PROMPT + " Where to?\n\nHuman: Paris.\n\nAssistant:"
    rows = normalise(rows_of({"chosen": prompt + " Great choice.", "rejected": prompt + " Boring."}), "preference")
    assert rows[0].data == {"prompt": prompt, "chosen": " Great choice.", "rejected": " Boring."}


def test_implicit_preference_with_a_custom_marker():
    rows = normalise(
        rows_of({"chosen": "Q: hi\nA: hello", "rejected": "Q: hi\nA: go"}), "preference", prompt_marker="\nA:"
    )
    assert rows[0].data == {"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " go"}


def test_implicit_preference_without_the_marker_is_a_row_problem():
    result = normalise_rows(
        rows_of(
            {"chosen": HH_PROMPT + " yes", "rejected": HH_PROMPT + " no"},
            {"chosen": "User: a", "rejected": "User: b"},
        ),
        "preference",
    )
    assert [row.where for row in result.rows] == ["d.jsonl:1"]
    (problem,) = result.problems
    assert problem.where == "d.jsonl:2" and not problem.fatal
    assert "the prompt marker '\\n\\nAssistant:' does not occur" in problem.message
    assert "set data.prompt_marker" in problem.message


def test_implicit_preference_message_lists_split_after_the_shared_messages():
    shared = [user("hi"), assistant("hello"), user("joke?")]
    rows = normalise(
        rows_of({"chosen": shared + [assistant("a pun")], "rejected": shared + [assistant("no")]}), "preference"
    )
    assert rows[0].data == {"prompt": shared, "chosen": [assistant("a pun")], "rejected": [assistant("no")]}


def test_prompts_from_sft_messages_are_the_turns_before_the_last_reply_deduplicated(caplog):
    conversation = [user("hi"), assistant("hello"), user("bye")]
    items = [
        {"messages": conversation + [assistant("see you")]},
        {"messages": conversation + [assistant("ciao")]},
        {"messages": [user("other")]},
    ]
    with caplog.at_level(logging.INFO, logger="rlhf.data.formats"):
        result = normalise_rows(rows_of(*items), "prompt")
    assert [(row.where, row.data) for row in result.rows] == [
        ("d.jsonl:1", {"prompt": conversation}),
        ("d.jsonl:3", {"prompt": [user("other")]}),
    ]
    assert result.format == "messages"
    assert result.num_duplicates_removed == 1
    assert "removed 1 duplicate prompts" in caplog.text


def test_prompts_from_preference_data_ignore_the_answers():
    items = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": 3, "rejected": "y"},
        {"prompt": "a", "chosen": "z", "rejected": "w"},
    ]
    result = normalise_rows(rows_of(*items), "prompt")
    assert [row.data for row in result.rows] == [{"prompt": "a"}, {"prompt": "b"}]
    assert (result.format, result.num_duplicates_removed, result.problems) == ("preference", 1, [])


def test_prompts_from_implicit_preference_data_are_split_at_the_marker():
    result = normalise_rows(rows_of({"chosen": HH_PROMPT + " Sure", "rejected": HH_PROMPT + " Sorry"}), "prompt")
    assert result.rows[0].data == {"prompt": HH_PROMPT}

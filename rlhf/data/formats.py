"""Dataset formats: which one a set of columns is, and how its rows become the canonical rows of a kind.

Formats (columns; the first that fits wins, in this order):

- ``preference``: ``prompt``, ``chosen``, ``rejected`` (strings, or message lists), optional numeric ``margin``;
- ``conversation_preference`` (UltraFeedback binarized): ``prompt`` a string, ``chosen`` and ``rejected`` whole
  conversations (message lists) that open with the same turns, the first user turn repeating ``prompt``; optional
  ``score_chosen`` / ``score_rejected`` (their difference is the margin when asked for), ``prompt_id`` and
  ``messages`` (which serves SFT from the same file);
- ``implicit_preference``: ``chosen``, ``rejected`` holding the whole conversation (Anthropic HH style) or message
  lists that start with the same messages;
- ``prompt_completion``: ``prompt``, ``completion`` (strings, or message lists);
- ``messages``: ``messages``, a list of ``{"role", "content"}`` (conversational SFT);
- ``prompt_only``: ``prompt``;
- ``text``: ``text`` (pretraining).

Kinds and the canonical rows they produce (other columns are dropped):

- ``text``: ``{"text"}`` from ``text``;
- ``sft``: ``{"prompt", "completion"}`` from ``prompt_completion``, ``{"messages"}`` from ``messages``;
- ``preference``: ``{"prompt", "chosen", "rejected"}`` (+ ``margin``) from ``preference``,
  ``conversation_preference`` and ``implicit_preference``;
- ``prompt``: ``{"prompt"}`` from any format with prompts, deduplicated keeping the first occurrence.

An implicit prompt is split off at the last ``prompt_marker`` inside the longest common prefix of ``chosen`` and
``rejected`` (the prompt keeps the marker), so two answers that start with the same letters are not cut mid-word.
For message lists the prompt is the messages both start with.

Normalisation reports wrong types and missing values as fatal problems and a missing prompt marker as a row
problem; content checks (empty text, identical pairs, length) are in ``rlhf.data.validation``.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from rlhf.data.loading import EMPTY_DATASET, Problem, Row, format_problems
from rlhf.data.splits import prompt_from_messages, prompt_key
from rlhf.errors import DataError

logger = logging.getLogger(__name__)

Kind = Literal["text", "sft", "preference", "prompt"]
KINDS: tuple[str, ...] = get_args(Kind)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
DEFAULT_PROMPT_MARKER = "\n\nAssistant:"
#: How many bad messages of one column a problem names.
_MESSAGES_SHOWN = 3


@dataclass(frozen=True)
class Format:
    """A dataset format: the columns it needs and a note on their content."""

    name: str
    columns: tuple[str, ...]
    note: str = ""

    def describe(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"{self.name} ({', '.join(self.columns)}{note})"


#: Every format, in the order detection tries them.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("preference", ("prompt", "chosen", "rejected"), "optional numeric margin"),
        Format("conversation_preference", ("prompt", "chosen", "rejected"),
               "UltraFeedback binarized: prompt a string, chosen and rejected whole conversations opening with it"),
        Format("implicit_preference", ("chosen", "rejected"), "whole conversations split at data.prompt_marker"),
        Format("prompt_completion", ("prompt", "completion")),
        Format("messages", ("messages",), "a list of {role, content}"),
        Format("prompt_only", ("prompt",)),
        Format("text", ("text",)),
    )
}

#: The formats each kind accepts, in detection order.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "sft": ("prompt_completion", "messages"),
    "preference": ("preference", "implicit_preference"),
    "prompt": ("preference", "implicit_preference", "prompt_completion", "messages", "prompt_only"),
}
_OPTIONAL_COLUMNS = ("margin", "score_chosen", "score_rejected")
_KNOWN_COLUMNS = frozenset(c for f in FORMATS.values() for c in f.columns) | frozenset(_OPTIONAL_COLUMNS)


@dataclass(frozen=True)
class Normalised:
    """Canonical rows (those without problems), the problems found, the detected format, prompts deduplicated."""

    rows: list[Row]
    problems: list[Problem]
    format: str
    num_duplicates_removed: int


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)}")


def columns_of(rows: Iterable[Row]) -> set[str]:
    """Every column that occurs in any row (rows of a jsonl file need not all have the same keys)."""
    columns: set[str] = set()
    for row in rows:
        columns.update(row.data)
    return columns


def fit_format(columns: set[str], kind: str | None = None) -> str | None:
    """The first format (of those ``kind`` accepts, or of all) whose columns are all present, else None."""
    for name in KIND_FORMATS[kind] if kind is not None else tuple(FORMATS):
        if set(FORMATS[name].columns) <= columns:
            return name
    return None


def schema_message(columns: set[str], kind: str | None = None) -> str:
    """Why ``columns`` fit no format: the columns found, the accepted formats, and near-miss column names."""
    names = KIND_FORMATS[kind] if kind is not None else tuple(FORMATS)
    expected = sorted({c for name in names for c in FORMATS[name].columns} | set(_OPTIONAL_COLUMNS))
    found = ", ".join(repr(c) for c in sorted(columns)) or "none"
    accepted = "; ".join(FORMATS[name].describe() for name in names)
    hints = ""
    for column in sorted(columns - set(expected)):
        match = difflib.get_close_matches(column.lower(), expected, n=1, cutoff=0.75)
        if match:
            hints += f" Column {column!r}: did you mean {match[0]!r}?"
    what = f"{kind} format" if kind is not None else "format"
    return (
        f"the columns fit no {what}. Columns found: {found}. Accepted: {accepted}.{hints} "
        "Rename the columns to match one of these formats."
    )


def detect_format(columns: set[str], kind: Kind | None = None, *, source: str = "the dataset") -> str:
    """The format of a dataset with these columns, among those ``kind`` accepts when given; DataError if none fits."""
    if kind is not None:
        check_kind(kind)
    name = fit_format(set(columns), kind)
    if name is None:
        raise DataError(f"{source}: {schema_message(set(columns), kind)}")
    return name


def normalise(
    rows: Sequence[Row], kind: Kind, *, prompt_marker: str = DEFAULT_PROMPT_MARKER, source: str | None = None,
    margin_from_scores: bool = False,
) -> list[Row]:
    """The canonical rows of ``kind``; raises DataError listing every row that cannot be normalised."""
    result = normalise_rows(rows, kind, prompt_marker=prompt_marker, source=source,
                            margin_from_scores=margin_from_scores)
    if result.problems:
        raise DataError(
            f"{source or result.problems[0].where}: {len(result.problems)} problems:\n"
            f"{format_problems(result.problems)}\nFix or remove these rows."
        )
    return result.rows


def normalise_rows(
    rows: Sequence[Row], kind: Kind, *, prompt_marker: str = DEFAULT_PROMPT_MARKER, source: str | None = None,
    margin_from_scores: bool = False,
) -> Normalised:
    """Canonical rows of ``kind`` plus a problem for each row that cannot be normalised, without raising for rows.
    ``margin_from_scores``: a ``conversation_preference`` pair's margin is ``score_chosen - score_rejected``.

    Raises DataError when the columns fit no format of ``kind`` (or there are no rows).
    """
    check_kind(kind)
    label = source or (rows[0].where if rows else "the dataset")
    if not rows:
        raise DataError(f"{label}: {EMPTY_DATASET}")
    name = conversation_layout(detect_format(columns_of(rows), kind, source=label), rows)
    canonical: list[Row] = []
    problems: list[Problem] = []
    first_form: dict[str, tuple[str, str]] = {}
    seen_prompts: set[str] = set()
    num_duplicates = 0
    for row in rows:
        data, issues = _convert(name, kind, row.data, prompt_marker)
        if data is not None and name == "conversation_preference" and kind == "preference" and margin_from_scores:
            data, issues = _score_margin(data, row.data)
        if data is not None:
            issues = _form_issues(data, row.where, first_form)
        if data is None or issues:
            problems.extend(Problem(row.where, message, fatal) for message, fatal in issues)
            continue
        if kind == "prompt":
            key = prompt_key(data)
            if key in seen_prompts:
                num_duplicates += 1
                continue
            seen_prompts.add(key)
        canonical.append(Row(row.where, data))
    if num_duplicates:
        logger.info("%s: removed %d duplicate prompts (kept the first of each)", label, num_duplicates)
    return Normalised(canonical, problems, name, num_duplicates)


def conversation_layout(name: str, rows: Sequence[Row]) -> str:
    """``conversation_preference`` for a ``preference`` dataset whose first complete row has a string prompt and
    message-list answers (UltraFeedback binarized); else ``name``."""
    if name != "preference":
        return name
    for row in rows:
        prompt, chosen, rejected = (row.data.get(c) for c in ("prompt", "chosen", "rejected"))
        if prompt is not None and chosen is not None and rejected is not None:
            if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
                return "conversation_preference"
            return name
    return name


def split_conversations(prompt: str, chosen: list, rejected: list) -> tuple[list, list, list] | str:
    """``(prompt turns, chosen answer, rejected answer)`` of an UltraFeedback pair: the prompt is the turns both
    conversations open with, and its first user turn must be ``prompt``; else the row's problem as a message."""
    parts = split_implicit_prompt(chosen, rejected, DEFAULT_PROMPT_MARKER)
    if parts is None:
        return ("chosen and rejected do not open with the same turns, so they share no prompt; start both with the "
                "conversation so far (the user turn holding 'prompt'), or remove the row")
    turns = parts[0]
    first_user = next((m.get("content") for m in turns if m.get("role") == "user"), None)
    if first_user is None or first_user.strip() != prompt.strip():
        found = "no user turn" if first_user is None else f"the user turn {_short(first_user)}"
        return (f"prompt {_short(prompt)} disagrees with the conversations, which open with {found}; make the "
                "first user turn of chosen and rejected the prompt, or remove the row")
    return parts


def split_implicit_prompt(chosen: Any, rejected: Any, prompt_marker: str) -> tuple[Any, Any, Any] | None:
    """``(prompt, chosen, rejected)`` from two whole conversations, or None when no prompt can be split off.

    Strings split after the last ``prompt_marker`` inside their longest common prefix. Message lists split after the
    messages both start with (the last message stays an answer when the lists are identical).
    """
    if isinstance(chosen, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(prompt_marker)
        if cut < 0:
            return None
        cut += len(prompt_marker)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    count = 0
    while count < min(len(chosen), len(rejected)) and chosen[count] == rejected[count]:
        count += 1
    if chosen == rejected:
        # Identical lists would leave two empty answers; keeping the last message lets validation say "identical".
        count = len(chosen) - 1
    if count <= 0:
        return None
    return chosen[:count], chosen[count:], rejected[count:]


def _convert(
    name: str, kind: str, data: dict[str, Any], marker: str
) -> tuple[dict[str, Any] | None, list[tuple[str, bool]]]:
    """A row of format ``name`` as a canonical row of ``kind``, or None and its ``(message, fatal)`` issues."""
    columns = FORMATS[name].columns
    if kind == "prompt" and "prompt" in columns:
        # Only the prompt is used, so other columns need not be valid.
        columns = ("prompt",)
    missing = [column for column in columns if data.get(column) is None]
    if missing:
        return None, [(_missing_message(column, data), True) for column in missing]
    issues: list[str] = []
    if name == "text":
        if not isinstance(data["text"], str):
            issues.append(f"text is {_describe(data['text'])}, expected a string; fix the value or remove the row")
    elif name == "messages":
        issues += _message_issues(data["messages"], "messages")
    elif name == "conversation_preference" and kind != "prompt":
        issues += _conversation_issues(data)
    else:
        for column in columns:
            issues += _text_or_messages_issues(data[column], column)
        if not issues:
            issues += _mixed_issues(data, columns)
    if name == "preference" and kind == "preference":
        issues += _margin_issues(data.get("margin"))
    if issues:
        return None, [(message, True) for message in issues]

    if kind == "text":
        return {"text": data["text"]}, []
    if kind == "sft":
        if name == "messages":
            return {"messages": _copy(data["messages"])}, []
        return {"prompt": _copy(data["prompt"]), "completion": _copy(data["completion"])}, []
    if name == "implicit_preference":
        parts = split_implicit_prompt(data["chosen"], data["rejected"], marker)
        if parts is None:
            return None, [(_no_prompt_message(data["chosen"], marker), False)]
        prompt, chosen, rejected = parts
    elif name == "conversation_preference" and kind != "prompt":
        parts = split_conversations(data["prompt"], data["chosen"], data["rejected"])
        if isinstance(parts, str):
            return None, [(parts, False)]
        prompt, chosen, rejected = parts
    elif name == "conversation_preference":  # kind "prompt": the user turn the conversations open with
        prompt, chosen, rejected = [{"role": "user", "content": data["prompt"]}], None, None
    elif name == "messages":
        prompt, chosen, rejected = prompt_from_messages(data["messages"]), None, None
    else:
        prompt, chosen, rejected = data["prompt"], data.get("chosen"), data.get("rejected")
    if kind == "prompt":
        return {"prompt": _copy(prompt)}, []
    row = {"prompt": _copy(prompt), "chosen": _copy(chosen), "rejected": _copy(rejected)}
    if data.get("margin") is not None:
        row["margin"] = float(data["margin"])
    return row, []


def _copy(value: Any) -> Any:
    return [dict(message) for message in value] if isinstance(value, list) else value


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _missing_message(column: str, data: dict[str, Any]) -> str:
    if column in data:
        return f"{column} is null; give it a value or remove the row"
    others = [key for key in data if key not in _KNOWN_COLUMNS]
    match = difflib.get_close_matches(column, [key.lower() for key in others], n=1, cutoff=0.75)
    hint = ""
    if match:
        original = next(key for key in others if key.lower() == match[0])
        hint = f" (the row has {original!r}: did you mean {column!r}?)"
    return f"missing column {column!r}{hint}; add it to the row or remove the row"



def _text_or_messages_issues(value: Any, column: str) -> list[str]:
    if isinstance(value, str):
        return []
    if isinstance(value, list):
        return _message_issues(value, column)
    return [f"{column} is {_describe(value)}, expected a string or a list of messages; fix the value or remove the row"]


def _message_issues(value: Any, column: str) -> list[str]:
    """Type problems of a message list: each item an object with a known string role and string content."""
    if not isinstance(value, list):
        return [
            f"{column} is {_describe(value)}, expected a list of {{'role', 'content'}} messages (in a csv cell, "
            "a JSON array); fix the value or remove the row"
        ]
    roles = ", ".join(ROLES)
    issues = []
    for index, message in enumerate(value):
        at = f"{column}[{index}]"
        if not isinstance(message, dict):
            issues.append(f"{at} is {_describe(message)}, expected an object with 'role' and 'content'")
            continue
        role, content = message.get("role"), message.get("content")
        if role is None:
            issues.append(f"{at} has no 'role'; give each message a role ({roles})")
        elif role not in ROLES:
            issues.append(f"{at} has role {role!r}; use one of {roles} (e.g. 'human' is 'user', 'gpt' 'assistant')")
        if content is None:
            issues.append(f"{at} has no 'content'; give each message its text as a string")
        elif not isinstance(content, str):
            issues.append(f"{at}['content'] is {_describe(content)}, expected a string")
    if len(issues) > _MESSAGES_SHOWN:
        issues = issues[:_MESSAGES_SHOWN] + [f"{column}: {len(issues) - _MESSAGES_SHOWN} more message problems"]
    return issues


def _conversation_issues(data: dict[str, Any]) -> list[str]:
    """Types of an UltraFeedback row: a string prompt and two message lists."""
    issues = [] if isinstance(data["prompt"], str) else [
        f"prompt is {_describe(data['prompt'])}, expected a string (this dataset's other rows have a string prompt "
        "and whole conversations in chosen and rejected); fix the value or remove the row"]
    for column in ("chosen", "rejected"):
        if isinstance(data[column], list):
            issues += _message_issues(data[column], column)
        else:
            issues.append(f"{column} is {_describe(data[column])}, expected the whole conversation as a list of "
                          "messages like this dataset's other rows; fix the value or remove the row")
    return issues


def _score_margin(row: dict[str, Any], data: dict[str, Any]) -> tuple[dict[str, Any] | None, list[tuple[str, bool]]]:
    """``row`` with the margin ``score_chosen - score_rejected`` (data.margin_from_scores)."""
    issues = []
    for column in ("score_chosen", "score_rejected"):
        value = data.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            issues.append((f"{column} is {_describe(value)}, expected a finite number: data.margin_from_scores=true "
                           "takes the margin from the scores; fix the value or set data.margin_from_scores=false",
                           True))
    if issues:
        return None, issues
    return {**row, "margin": float(data["score_chosen"]) - float(data["score_rejected"])}, []


def _mixed_issues(data: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """A row must use strings for all its columns or message lists for all."""
    lists = [column for column in columns if isinstance(data[column], list)]
    if not lists or len(lists) == len(columns):
        return []
    strings = [column for column in columns if column not in lists]
    return [
        f"{', '.join(lists)} {'is a message list' if len(lists) == 1 else 'are message lists'} but "
        f"{', '.join(strings)} {'is a string' if len(strings) == 1 else 'are strings'}; use strings for all of "
        f"{', '.join(columns)} or message lists for all"
    ]


def _margin_issues(margin: Any) -> list[str]:
    if margin is None:
        return []
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return [f"margin is {_describe(margin)}, expected a finite number; fix it or leave it out"]
    return []


def _form_issues(data: dict[str, Any], where: str, first_form: dict[str, tuple[str, str]]) -> list[tuple[str, bool]]:
    """A column holds strings in every row or message lists in every row; records the first row's form."""
    issues = []
    for column, value in data.items():
        if column == "margin":
            continue
        form = "a message list" if isinstance(value, list) else "a string"
        first = first_form.setdefault(column, (form, where))
        if first[0] != form:
            issues.append(
                (f"{column} is {form} here but {first[0]} in {first[1]}; use one form for the whole dataset", True)
            )
    return issues


def _no_prompt_message(chosen: Any, marker: str) -> str:
    if isinstance(chosen, str):
        return (
            f"the prompt marker {marker!r} does not occur in the text that chosen and rejected start with, so no "
            "prompt can be split off; set data.prompt_marker to the text that opens the answer, add a 'prompt' "
            "column, or remove the row"
        )
    return (
        "chosen and rejected do not start with the same messages, so no prompt can be split off; start both with "
        "the conversation so far, add a 'prompt' column, or remove the row"
    )

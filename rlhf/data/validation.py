"""Row validation: every problem of a dataset found in one pass, then the bad-row policy applied.

Problems are fatal or not. Fatal problems (an unreadable line, a wrong type, a missing column, columns that fit no
format) always stop the run. Row-content problems (empty text, ``chosen`` equal to ``rejected``, a row over
``max_length`` tokens, no prompt marker in an implicit-prompt pair) follow ``data.on_bad_row``: ``error`` stops the
run listing them, ``drop`` skips those rows with one warning and still stops when more than
``data.max_bad_fraction`` of the rows are bad. Rows are never truncated.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.data.formats import (
    DEFAULT_PROMPT_MARKER,
    KINDS,
    Kind,
    check_kind,
    columns_of,
    fit_format,
    normalise_rows,
    schema_message,
)
from rlhf.data.loading import EMPTY_DATASET, Problem, Row, format_problems, locator_order, scan_rows
from rlhf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

OnBadRow = Literal["error", "drop"]
ON_BAD_ROW: tuple[str, ...] = ("error", "drop")
#: How many dropped rows the warning names.
_NAMED_IN_WARNING = 5
#: Message roles whose empty content makes a row useless (an empty system prompt or tool output is legitimate).
_TEXT_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ValidationResult:
    """The usable canonical rows, every problem found, and the counts a stage records in its manifest."""

    rows: list[Row]
    problems: list[Problem]
    num_total: int
    num_dropped: int
    format: str = ""
    num_duplicates_removed: int = 0


@dataclass(frozen=True)
class SourceReport:
    """What ``check_source`` found: every problem, the rows read, the detected format (None if none fits)."""

    problems: list[Problem]
    num_rows: int
    format: str | None
    num_duplicates_removed: int


@dataclass(frozen=True)
class _Inspection:
    rows: list[Row]
    problems: list[Problem]
    format: str
    num_duplicates_removed: int


def content_issues(
    data: dict[str, Any],
    kind: Kind,
    *,
    token_length: Callable[[dict[str, Any]], int] | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Row-content problems of one canonical row, each saying what is wrong and what to change."""
    issues = []
    for column, value in data.items():
        if column == "margin":
            continue
        if isinstance(value, str):
            if not value.strip():
                issues.append(f"{column} is empty or whitespace only; fill it in or remove the row")
        elif not value:
            issues.append(f"{column} has no messages; fill it in or remove the row")
        else:
            for index, message in enumerate(value):
                blank = not message["content"].strip() and not message.get("tool_calls")
                if message["role"] in _TEXT_ROLES and blank:
                    issues.append(
                        f"{column}[{index}] ({message['role']}) has empty content; fill it in or remove the row"
                    )
                    break
    if data.get("messages") and not any(message["role"] == "assistant" for message in data["messages"]):
        issues.append("messages has no assistant turn, so there is nothing to learn; add the reply or remove the row")
    if kind == "preference" and _same_answer(data["chosen"], data["rejected"]):
        issues.append("chosen and rejected are identical, so the pair shows no preference; fix one or remove the row")
    if max_length is not None and token_length is not None:
        length = token_length(data)
        if length > max_length:
            # Truncating instead could cut a pair where its answers differ and leave chosen == rejected.
            issues.append(
                f"the row is {length} tokens long, over data.max_length={max_length}; shorten or remove it, or raise "
                "data.max_length (rows are never truncated)"
            )
    return issues


def validate_rows(
    rows: Sequence[Row],
    kind: Kind,
    *,
    source: str,
    on_bad_row: OnBadRow = "drop",
    max_bad_fraction: float = 0.05,
    token_length: Callable[[dict[str, Any]], int] | None = None,
    max_length: int | None = None,
    prompt_marker: str = DEFAULT_PROMPT_MARKER,
    prior_problems: Sequence[Problem] = (),
    margin_from_scores: bool = False,
) -> ValidationResult:
    """Normalise and check ``rows`` (loaded or already canonical) and apply the bad-row policy.

    ``prior_problems`` are problems found while reading the source (``scan_rows``), reported with the rest so that
    one run shows every problem. Raises DataError on any fatal problem, on bad rows under ``on_bad_row="error"``,
    when the dropped fraction exceeds ``max_bad_fraction``, and when no row is left.
    """
    check_kind(kind)
    _check_policy(on_bad_row, max_bad_fraction, token_length, max_length)
    found = _inspect(rows, kind, source, prompt_marker, token_length, max_length, prior_problems,
                     margin_from_scores)
    fatal = [problem for problem in found.problems if problem.fatal]
    others = [problem for problem in found.problems if not problem.fatal]
    if fatal:
        also = f", and {_count_rows(others)} more rows have content problems" if others else ""
        raise DataError(
            f"{source}: {_count_rows(fatal)} rows have problems that data.on_bad_row cannot skip (unreadable, "
            f"wrong type or missing column){also}:\n{format_problems(fatal + others)}\nFix these rows and run again."
        )
    num_total = len(rows)
    bad = list(dict.fromkeys(problem.where for problem in others))
    if bad and on_bad_row == "error":
        raise DataError(
            f"{source}: {len(bad)} of {num_total} rows have problems:\n{format_problems(others)}\n"
            "Fix or remove these rows, or set data.on_bad_row=drop to skip such rows "
            f"(the run still fails when more than data.max_bad_fraction={max_bad_fraction:g} of the rows are bad)."
        )
    if bad:
        fraction = len(bad) / num_total
        if fraction > max_bad_fraction:
            raise DataError(
                f"{source}: {len(bad)} of {num_total} rows ({fraction:.1%}) have problems, more than "
                f"data.max_bad_fraction={max_bad_fraction:g} allows:\n{format_problems(others)}\n"
                "Fix the data, or raise data.max_bad_fraction if dropping this many rows is intended."
            )
        named = ", ".join(bad[:_NAMED_IN_WARNING]) + (", ..." if len(bad) > _NAMED_IN_WARNING else "")
        logger.warning(
            "%s: dropped %d of %d rows with problems (%s); `rlhf validate-data %s --format %s` lists them all",
            source, len(bad), num_total, named, source, kind,
        )
    if not found.rows:
        raise DataError(f"{source}: no usable rows are left; fix the data (see `rlhf validate-data`)")
    return ValidationResult(found.rows, found.problems, num_total, len(bad), found.format, found.num_duplicates_removed)


def check_source(
    path: str,
    kind: Kind,
    *,
    split: str | None = None,
    prompt_marker: str = DEFAULT_PROMPT_MARKER,
    token_length: Callable[[dict[str, Any]], int] | None = None,
    max_length: int | None = None,
    margin_from_scores: bool = False,
) -> SourceReport:
    """Every problem of a source, fatal or not, without raising for any of them."""
    check_kind(kind)
    try:
        rows, load_problems = scan_rows(path, split=split)
    except DataError as err:
        return SourceReport([_problem_from_error(err, path)], 0, None, 0)
    num_rows = len(rows) + len({problem.where for problem in load_problems})
    if not rows:
        return SourceReport(load_problems or [Problem(path, EMPTY_DATASET, True)], num_rows, None, 0)
    columns = columns_of(rows)
    if fit_format(columns, kind) is None:
        return SourceReport(load_problems + [Problem(path, schema_message(columns, kind), True)], num_rows, None, 0)
    found = _inspect(rows, kind, path, prompt_marker, token_length, max_length, load_problems, margin_from_scores)
    return SourceReport(found.problems, num_rows, found.format, found.num_duplicates_removed)


def validate_file(
    path: str, kind: Kind, *, prompt_marker: str = DEFAULT_PROMPT_MARKER, split: str | None = None
) -> list[Problem]:
    """Every problem of a dataset file (or saved/hub dataset), fatal or not, in row order."""
    return check_source(path, kind, split=split, prompt_marker=prompt_marker).problems


def validate_data_main(argv: list[str] | None = None) -> int:
    """``rlhf validate-data FILE --format KIND``: print every problem as ``where: message``, then a summary line.

    Returns 1 when any problem was found, 0 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="rlhf validate-data",
        description="List every problem of a dataset with its file:row, without loading any model.",
    )
    parser.add_argument("file", help="a .jsonl/.json/.parquet/.csv file, a save_to_disk directory or a hub dataset")
    parser.add_argument("--format", dest="kind", required=True, choices=KINDS, help="what the data is for")
    parser.add_argument("--split", default=None, help="split of a saved or hub dataset, or key of a .json object")
    parser.add_argument(
        "--prompt-marker",
        default=DEFAULT_PROMPT_MARKER,
        help=r"where implicit-prompt preference texts split (\n and \t are read as newline and tab); "
        r"default '\n\nAssistant:'",
    )
    parser.add_argument("--margin-from-scores", action="store_true",
                        help="UltraFeedback layout: check score_chosen / score_rejected, which give the pair's margin")
    args = parser.parse_args(argv)
    marker = args.prompt_marker.replace("\\n", "\n").replace("\\t", "\t")
    report = check_source(args.file, args.kind, split=args.split, prompt_marker=marker,
                          margin_from_scores=args.margin_from_scores)
    for problem in report.problems:
        print(problem)
    details = f"format {report.format}" if report.format else "no format fits"
    if report.num_duplicates_removed:
        details += f", {report.num_duplicates_removed} duplicate prompts"
    if report.problems:
        num_fatal = sum(problem.fatal for problem in report.problems)
        print(
            f"{args.file}: {len(report.problems)} problems ({num_fatal} fatal) in {report.num_rows} rows; {details}"
        )
        return 1
    print(f"{args.file}: no problems in {report.num_rows} rows; {details}")
    return 0


def _inspect(
    rows: Sequence[Row],
    kind: Kind,
    source: str,
    prompt_marker: str,
    token_length: Callable[[dict[str, Any]], int] | None,
    max_length: int | None,
    prior_problems: Sequence[Problem],
    margin_from_scores: bool = False,
) -> _Inspection:
    """Normalisation and content problems together, in row order; raises DataError only for the schema."""
    if not rows:
        if prior_problems:
            raise DataError(f"{source}: no row can be read:\n{format_problems(prior_problems)}\nFix these lines.")
        raise DataError(f"{source}: {EMPTY_DATASET}")
    try:
        normalised = normalise_rows(rows, kind, prompt_marker=prompt_marker, source=source,
                                    margin_from_scores=margin_from_scores)
    except DataError as err:
        if not prior_problems:
            raise
        raise DataError(f"{err}\nAlso:\n{format_problems(prior_problems)}") from None
    problems = list(prior_problems) + normalised.problems
    clean = []
    for row in normalised.rows:
        issues = content_issues(row.data, kind, token_length=token_length, max_length=max_length)
        problems.extend(Problem(row.where, message, False) for message in issues)
        if not issues:
            clean.append(row)
    # A stable sort: per row, reading and normalisation problems stay before content problems.
    problems.sort(key=lambda problem: locator_order(problem.where))
    return _Inspection(clean, problems, normalised.format, normalised.num_duplicates_removed)


def _check_policy(
    on_bad_row: str, max_bad_fraction: float, token_length: Callable[..., int] | None, max_length: int | None
) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"data.on_bad_row={on_bad_row!r} is not allowed; use one of {', '.join(ON_BAD_ROW)}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={max_bad_fraction} is out of range; use a value in [0, 1]")
    if max_length is not None and token_length is None:
        raise ValueError("max_length needs token_length to measure rows")


def _same_answer(chosen: Any, rejected: Any) -> bool:
    if isinstance(chosen, str) and isinstance(rejected, str):
        return chosen.strip() == rejected.strip()
    return chosen == rejected


def _count_rows(problems: Sequence[Problem]) -> int:
    return len({problem.where for problem in problems})


def _problem_from_error(err: DataError, source: str) -> Problem:
    """A source-level DataError ("SOURCE: message" or "SOURCE:LINE: message") as a Problem."""
    text = str(err)
    match = re.match(rf"^({re.escape(source)}(?::\d+)?): (.*)$", text, flags=re.DOTALL)
    if match is None:
        return Problem(source, text, True)
    return Problem(match.group(1), match.group(2), True)

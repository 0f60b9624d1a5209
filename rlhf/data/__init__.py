"""Datasets for every stage: loading, format detection and normalisation, row validation, evaluation splits.

Stages call ``prepare_dataset`` once; it reads the source, converts its rows to the canonical form of the stage's
kind (see ``rlhf.data.formats``), reports every bad row with its file:row locator (see ``rlhf.data.loading``),
applies ``data.on_bad_row``, holds out or loads evaluation rows, and returns plain dict rows with the stats a stage
records in its manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.data.formats import (
    DEFAULT_PROMPT_MARKER,
    FORMATS,
    KIND_FORMATS,
    KINDS,
    ROLES,
    Kind,
    Normalised,
    detect_format,
    normalise,
    normalise_rows,
    split_implicit_prompt,
)
from rlhf.data.loading import Problem, Row, load_rows, scan_rows
from rlhf.data.splits import check_no_overlap, prompt_from_messages, prompt_key, split_eval
from rlhf.data.validation import (
    OnBadRow,
    SourceReport,
    ValidationResult,
    check_source,
    validate_data_main,
    validate_file,
    validate_rows,
)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DEFAULT_PROMPT_MARKER",
    "FORMATS",
    "KIND_FORMATS",
    "KINDS",
    "ROLES",
    "Kind",
    "Normalised",
    "OnBadRow",
    "PreparedData",
    "Problem",
    "Row",
    "SourceReport",
    "ValidationResult",
    "check_no_overlap",
    "check_source",
    "detect_format",
    "load_rows",
    "normalise",
    "normalise_rows",
    "prepare_dataset",
    "prompt_from_messages",
    "prompt_key",
    "scan_rows",
    "split_eval",
    "split_implicit_prompt",
    "to_hf_dataset",
    "validate_data_main",
    "validate_file",
    "validate_rows",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """Canonical train and eval rows as plain dicts, and the stats a stage records in its manifest."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: dict[str, Any]


def prepare_dataset(
    path: str,
    kind: Kind,
    *,
    split: str | None = "train",
    eval_path: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    prompt_marker: str = DEFAULT_PROMPT_MARKER,
    on_bad_row: OnBadRow = "drop",
    max_bad_fraction: float = 0.05,
    token_length: Callable[[dict[str, Any]], int] | None = None,
    max_length: int | None = None,
    margin_from_scores: bool = False,
) -> PreparedData:
    """Load, normalise and validate ``path``, then hold out or load evaluation rows and check they share no prompt.

    Evaluation rows come from ``eval_path`` (its ``eval_split``), else from the ``eval_split`` of ``path``, else
    ``eval_fraction`` of ``path``'s prompts are held out (``split_eval``); ``eval_fraction`` is ignored when there
    is separate eval data. The eval source is validated with the same settings.
    """
    checks: dict[str, Any] = dict(
        on_bad_row=on_bad_row,
        max_bad_fraction=max_bad_fraction,
        token_length=token_length,
        max_length=max_length,
        prompt_marker=prompt_marker,
        margin_from_scores=margin_from_scores,
    )
    train_result = _read(path, split, kind, checks)
    eval_source = eval_path if eval_path is not None else (path if eval_split is not None else None)
    eval_result = None
    if eval_source is not None:
        eval_result = _read(eval_source, eval_split, kind, checks)
        train_rows, eval_rows = train_result.rows, eval_result.rows
        overlap_source = f"{path} and {eval_source}" if eval_source != path else f"{path} ({split} and {eval_split})"
    else:
        train_rows, eval_rows = split_eval(train_result.rows, eval_fraction, seed, source=path)
        overlap_source = path
    if eval_rows:
        check_no_overlap(train_rows, eval_rows, source=overlap_source)
    stats = {
        **_source_stats(path, split, train_result),
        "num_train": len(train_rows),
        "num_eval": len(eval_rows),
        "eval_fraction": eval_fraction if eval_source is None else 0.0,
        "seed": seed,
        "eval": _source_stats(eval_source, eval_split, eval_result) if eval_result is not None else None,
    }
    logger.info(
        "%s: %d rows (format %s), %d dropped, %d duplicate prompts removed; %d train, %d eval rows",
        path, train_result.num_total, train_result.format, train_result.num_dropped,
        train_result.num_duplicates_removed, len(train_rows), len(eval_rows),
    )
    return PreparedData([row.data for row in train_rows], [row.data for row in eval_rows], stats)


def prepare_stage_data(cfg: Any, kind: Kind, token_length: Callable[[dict[str, Any]], int] | None = None,
                       ) -> PreparedData:
    """`prepare_dataset` with the settings of a stage config's ``data`` section and its seed."""
    data = cfg.data
    return prepare_dataset(data.path, kind, split=data.split, eval_path=data.eval_path, eval_split=data.eval_split,
                           eval_fraction=data.eval_fraction, seed=cfg.seed, prompt_marker=data.prompt_marker,
                           on_bad_row=data.on_bad_row, max_bad_fraction=data.max_bad_fraction,
                           token_length=token_length, max_length=data.max_length,
                           margin_from_scores=data.margin_from_scores)


def to_hf_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of canonical rows; a column missing from some rows (``margin``) is None there."""
    import datasets

    # Dataset.from_list takes its columns from the first row only, which would lose a column absent there.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})


def _read(source: str, split: str | None, kind: str, checks: dict[str, Any]) -> ValidationResult:
    rows, problems = scan_rows(source, split=split)
    return validate_rows(rows, kind, source=source, prior_problems=problems, **checks)


def _source_stats(source: str, split: str | None, result: ValidationResult) -> dict[str, Any]:
    return {
        "source": source,
        "split": split,
        "format": result.format,
        "num_rows": result.num_total,
        "num_dropped": result.num_dropped,
        "num_duplicates_removed": result.num_duplicates_removed,
    }

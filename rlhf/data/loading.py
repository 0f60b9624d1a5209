"""Reading rows from local files, saved datasets and hub datasets, each row tagged with where it came from.

Row locators (``Row.where``), used in every message about a row:

- ``.jsonl`` and ``.csv``: ``path:LINE``, 1-based line numbers. A csv header is line 1; a record whose quoted cell
  spans several lines is located at the line where it starts.
- ``.json``: ``path[row I]`` for a top-level array, ``path:KEY[row I]`` for an array under a key; I is 0-based.
- ``.parquet``: ``path[row I]``, 0-based.
- a ``save_to_disk`` directory: ``path[row I]`` for a ``Dataset``, ``path:SPLIT[row I]`` for a ``DatasetDict``.
- a hub dataset: ``name:SPLIT[row I]`` (``name[row I]`` when no split was asked for and the dataset has one).
- a problem with the whole source (missing file, unreadable parquet): the source as given.

What a source is:

- an existing file is read by its suffix (``.jsonl``, ``.json``, ``.parquet``, ``.csv``; anything else is an error);
- an existing directory must be written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- a missing source that looks like a path is "file not found": it is absolute, starts with ``.`` or ``~``, has more
  than one ``/`` (hub ids are ``name`` or ``owner/name``) or a backslash, or ends in a data-file suffix;
- anything else is a hub dataset name for ``datasets.load_dataset``.

``split`` picks a split of a ``DatasetDict``, a hub dataset or a split-keyed ``.json`` object; ``.jsonl``, ``.csv``,
``.parquet`` and array ``.json`` files hold one split and ignore it.

A ``.json`` file holds an array of row objects, or an object. From an object, the array under the key ``split`` is
read; failing that, an object with a single key is read when that key is ``data``, ``rows`` or ``examples`` or when
no split was asked for. Anything else is an error listing the keys.

In a ``.csv`` file every cell is a string, with two exceptions: a ``margin`` cell is read as a number (an empty cell
means no margin), and a cell of a message column (``messages``, ``prompt``, ``completion``, ``chosen``,
``rejected``) that holds a JSON array of objects is read as a message list; any other cell stays the string it is.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import DataError

#: Columns whose csv cells may hold a JSON array of ``{"role", "content"}`` messages.
MESSAGE_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
#: Columns whose csv cells are read as numbers.
NUMERIC_COLUMNS = ("margin",)
#: Keys of a single-key ``.json`` object that wrap the rows rather than name a split.
JSON_WRAPPER_KEYS = ("data", "rows", "examples")
#: What is wrong with a source without rows, and what to change.
EMPTY_DATASET = "the dataset has no rows (an empty file, or only blank lines); give at least one row"
#: How many problems an error message lists before it only counts the rest.
MAX_LISTED = 20

_PATH_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".pq", ".gz", ".bz2", ".xz", ".zst")
_LOCATOR = re.compile(r"^(?P<source>.*?)(?::(?P<line>\d+)|\[row (?P<index>\d+)\])$")


@dataclass(frozen=True)
class Row:
    """One dataset row: ``where`` locates it in its source (see the module docstring), ``data`` maps column to value."""

    where: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """Something wrong with a row or a source.

    ``fatal`` problems (unreadable line, wrong type, missing column, wrong schema) stop every run; the others are
    row-content problems that ``data.on_bad_row`` decides on. ``message`` says what is wrong and what to change.
    """

    where: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def format_problems(problems: Sequence[Problem], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` problems, one indented ``where: message`` line each, then how many were left out."""
    lines = [f"  {problem}" for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def locator_order(where: str) -> tuple[str, int]:
    """Sort key that puts locators of one source in row order (``a.jsonl:9`` before ``a.jsonl:10``)."""
    match = _LOCATOR.match(where)
    if match is None:
        return where, -1
    number = match.group("line") or match.group("index")
    return match.group("source"), int(number)


def load_rows(source: str, *, split: str | None = None) -> list[Row]:
    """Every row of ``source``; raises DataError listing every unreadable row, or when there are no rows."""
    rows, problems = scan_rows(source, split=split)
    if problems:
        raise DataError(
            f"{source}: unreadable rows ({len(problems)}):\n{format_problems(problems)}\n"
            "Fix these lines and run again."
        )
    if not rows:
        raise DataError(f"{source}: {EMPTY_DATASET}")
    return rows


def scan_rows(source: str, *, split: str | None = None) -> tuple[list[Row], list[Problem]]:
    """The readable rows of ``source`` and a problem for each row that cannot be read (bad JSON or encoding).

    Raises DataError only when the source as a whole cannot be read: missing, unsupported, or not a dataset.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(source, path, split), []
    if path.is_file():
        reader = _FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{source}: unsupported file type '{path.suffix}'; give a .jsonl, .json, .parquet or .csv file, "
                "a directory written by save_to_disk, or a hub dataset name"
            )
        return reader(source, path, split)
    if looks_like_path(source):
        raise DataError(f"{source}: file not found; check the path (relative paths start at {os.getcwd()})")
    return _read_hub_dataset(source, split), []


def looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a hub dataset name."""
    if os.path.isabs(source) or source.startswith((".", "~")):
        return True
    if source.count("/") > 1 or "\\" in source:
        return True
    return source.lower().endswith(_PATH_SUFFIXES)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _json_error(err: json.JSONDecodeError) -> str:
    # Some messages end in " at", written to be followed by the position.
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _lines(source: str, path: Path, problems: list[Problem]) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, ok)`` per line; a line that is not UTF-8 gets a problem and ``ok`` False."""
    # Splitting the bytes on b"\n" alone keeps line numbers equal to what editors show (str.splitlines would also
    # split on \x0b, \x1c, \u2028 and friends).
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig drops the byte-order mark some editors write at the start of the file.
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8"), True
            except UnicodeDecodeError as err:
                problems.append(
                    Problem(
                        f"{source}:{number}",
                        f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                        "re-encode the file as UTF-8",
                        fatal=True,
                    )
                )
                yield number, raw.decode("utf-8", errors="replace"), False


def _read_jsonl(source: str, path: Path, split: str | None) -> tuple[list[Row], list[Problem]]:
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, text, ok in _lines(source, path, problems):
        if not ok or not text.strip():
            continue
        where = f"{source}:{number}"
        try:
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            problems.append(
                Problem(where, f"malformed JSON ({_json_error(err)}); write one JSON object per line", True)
            )
            continue
        if not isinstance(value, dict):
            problems.append(
                Problem(
                    where,
                    f"the line holds a JSON {_json_type(value)}, not an object; write each row as one object "
                    'such as {"prompt": ..., "completion": ...}',
                    True,
                )
            )
            continue
        rows.append(Row(where, value))
    return rows, problems


def _read_json(source: str, path: Path, split: str | None) -> tuple[list[Row], list[Problem]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{source}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-encode the file as UTF-8"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = "; the file looks like JSON Lines (one object per line): rename it to .jsonl"
        raise DataError(
            f"{source}:{err.lineno}: malformed JSON ({_json_error(err)}); fix the file{hint}"
        ) from None
    items, prefix = _json_rows(source, value, split)
    rows: list[Row] = []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        where = f"{prefix}[row {index}]"
        if isinstance(item, dict):
            rows.append(Row(where, item))
        else:
            problems.append(
                Problem(where, f"a JSON {_json_type(item)}, not an object; write each row as one object", True)
            )
    return rows, problems


def _json_rows(source: str, value: Any, split: str | None) -> tuple[list[Any], str]:
    """The array of rows in a parsed ``.json`` file and the locator prefix of its rows (rule in the docstring)."""
    if isinstance(value, list):
        return value, source
    if not isinstance(value, dict):
        raise DataError(
            f"{source}: the file holds a JSON {_json_type(value)}; give an array of row objects, "
            'or an object mapping split names to arrays such as {"train": [...]}'
        )
    keys = list(value)
    if split is not None and split in value:
        key = split
    elif len(keys) == 1 and (split is None or keys[0] in JSON_WRAPPER_KEYS):
        key = keys[0]
    else:
        listed = ", ".join(repr(k) for k in keys) or "none"
        wanted = f"no split {split!r}" if split is not None else "several keys and no split was chosen"
        raise DataError(
            f"{source}: the top-level object has {wanted} (its keys: {listed}); set data.split to the key that "
            "holds the rows, or make the top level an array of row objects"
        )
    if not isinstance(value[key], list):
        raise DataError(
            f"{source}: the value under {key!r} is a JSON {_json_type(value[key])}; it must be an array of row objects"
        )
    return value[key], f"{source}:{key}"


def _read_csv(source: str, path: Path, split: str | None) -> tuple[list[Row], list[Problem]]:
    problems: list[Problem] = []
    bad_lines: set[int] = set()

    def texts() -> Iterator[str]:
        for number, text, ok in _lines(source, path, problems):
            if not ok:
                bad_lines.add(number)
            yield text

    # Long pretraining texts easily pass the module's default 128 KiB cell limit.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(texts())
    rows: list[Row] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows, problems
        start = reader.line_num + 1
        for record in reader:
            first, last = start, reader.line_num
            start = last + 1
            if not record or any(number in bad_lines for number in range(first, last + 1)):
                continue
            where = f"{source}:{first}"
            if len(record) != len(header):
                problems.append(
                    Problem(
                        where,
                        f"{len(record)} cells but the header (line 1) has {len(header)} columns; quote cells that "
                        'contain commas ("a, b")',
                        True,
                    )
                )
                continue
            rows.append(Row(where, {name: _csv_cell(name, cell) for name, cell in zip(header, record)}))
    except csv.Error as err:
        problems.append(Problem(f"{source}:{reader.line_num}", f"malformed csv ({err}); fix the quoting", True))
    return rows, problems


def _csv_cell(column: str, cell: str) -> Any:
    """A csv cell as a value: numbers for numeric columns, message lists for message columns (module docstring)."""
    if column in NUMERIC_COLUMNS:
        if not cell.strip():
            return None
        try:
            return float(cell)
        except ValueError:
            # Left as the string, so the type check names the column and the row.
            return cell
    if column in MESSAGE_COLUMNS and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return value
    return cell


def _read_parquet(source: str, path: Path, split: str | None) -> tuple[list[Row], list[Problem]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{source}: not a readable parquet file ({err}); write it again (pandas, datasets)") from None
    try:
        items = table.to_pylist()
    except UnicodeDecodeError:
        raise DataError(f"{source}: a string column holds bytes that are not UTF-8; re-encode it as UTF-8") from None
    return [Row(f"{source}[row {index}]", item) for index, item in enumerate(items)], []


def _read_saved_dataset(source: str, path: Path, split: str | None) -> list[Row]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{source}: a directory, but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk "
            "(no dataset_dict.json or state.json in it); give a data file or a saved dataset"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many kinds here; all mean the directory is unusable.
        raise DataError(f"{source}: cannot read the saved dataset ({err}); save it again with save_to_disk") from err
    return _dataset_rows(source, loaded, split)


def _read_hub_dataset(source: str, split: str | None) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as err:  # network, auth, missing repo or split: all reported the same way.
        raise DataError(
            f"{source}: no such local file or directory, and loading it as a hub dataset failed "
            f"({type(err).__name__}: {err}); check the path, or the dataset name and data.split"
        ) from err
    if split is not None and not isinstance(loaded, datasets.DatasetDict):
        return _rows_of(f"{source}:{split}", loaded)
    return _dataset_rows(source, loaded, split)


def _dataset_rows(source: str, loaded: Any, split: str | None) -> list[Row]:
    """Rows of a ``Dataset``, or of the chosen split of a ``DatasetDict``."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return _rows_of(source, loaded)
    names = list(loaded)
    if split is None:
        if len(names) != 1:
            raise DataError(
                f"{source}: holds the splits {', '.join(names)}; choose one with data.split (data.eval_split for "
                "eval data)"
            )
        split = names[0]
    elif split not in loaded:
        raise DataError(
            f"{source}: has no split {split!r} (it has {', '.join(names)}); set data.split (or data.eval_split) "
            "to one of these"
        )
    return _rows_of(f"{source}:{split}", loaded[split])


def _rows_of(prefix: str, dataset: Any) -> list[Row]:
    return [Row(f"{prefix}[row {index}]", item) for index, item in enumerate(dataset.to_list())]


_FILE_READERS: dict[str, Callable[[str, Path, str | None], tuple[list[Row], list[Problem]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}

"""Holding out evaluation rows, and making sure no evaluation prompt was also trained on."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from rlhf.data.loading import Row
from rlhf.errors import ConfigError, DataError

#: How many clashing rows an overlap error names.
_SHOWN = 5


def prompt_from_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages before the last assistant turn; all of them when there is no assistant turn."""
    last = max((i for i, message in enumerate(messages) if message.get("role") == "assistant"), default=None)
    return list(messages) if last is None else list(messages[:last])


def prompt_key(row_data: dict[str, Any]) -> str:
    """A canonical string of a normalised row's prompt, equal for rows that would show the model the same prompt.

    The prompt is the ``prompt`` column, else the messages before the last assistant turn, else (pretraining
    rows) the ``text``. String prompts are used as they are; message lists are JSON with sorted keys.
    """
    if "prompt" in row_data:
        value = row_data["prompt"]
    elif "messages" in row_data:
        value = prompt_from_messages(row_data["messages"])
    elif "text" in row_data:
        value = row_data["text"]
    else:
        raise ValueError(f"a normalised row has a prompt, messages or text column; got {sorted(row_data)}")
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def split_eval(
    rows: Sequence[Row], eval_fraction: float, seed: int, *, source: str = "the dataset"
) -> tuple[list[Row], list[Row]]:
    """Split rows into (train, eval), deterministically for a given seed; both keep the input order.

    Rows are grouped by prompt (``prompt_key``) and whole groups are held out, so a prompt never lands on both sides.
    ``eval_fraction`` is the fraction of distinct prompts held out, rounded, at least one when it is above zero and
    there are two or more rows, and never all of them.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={eval_fraction} is out of range; use a value in [0, 1), such as 0.05")
    if eval_fraction == 0.0 or len(rows) < 2:
        return list(rows), []
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(prompt_key(row.data), []).append(index)
    members = list(groups.values())
    if len(members) < 2:
        raise DataError(
            f"{source}: all {len(rows)} rows share one prompt, so no eval rows can be held out without training on "
            "the same prompt; give separate eval data (data.eval_path) or set data.eval_fraction=0"
        )
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    num_eval = min(len(members) - 1, max(1, round(eval_fraction * len(members))))
    held_out = {index for group in order[:num_eval] for index in members[group]}
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation


def check_no_overlap(train_rows: Sequence[Row], eval_rows: Sequence[Row], *, source: str) -> None:
    """Raise DataError when an eval row's prompt also occurs in the training rows."""
    first_seen: dict[str, str] = {}
    for row in train_rows:
        first_seen.setdefault(prompt_key(row.data), row.where)
    clashes = [
        (row.where, first_seen[key]) for row in eval_rows if (key := prompt_key(row.data)) in first_seen
    ]
    if not clashes:
        return
    shown = "; ".join(f"{eval_where} (as in {train_where})" for eval_where, train_where in clashes[:_SHOWN])
    more = f"; and {len(clashes) - _SHOWN} more" if len(clashes) > _SHOWN else ""
    raise DataError(
        f"{source}: {len(clashes)} of {len(eval_rows)} eval prompts also occur in the training data, so evaluation "
        f"would measure memorisation: {shown}{more}. Remove these prompts from one side (deduplicate the files), "
        "or drop the separate eval data and hold out rows with data.eval_fraction, which splits by prompt"
    )

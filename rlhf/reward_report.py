"""What a reward model is worth before PPO optimises it, measured on the held-out preference pairs.

`reward_model_report` takes each held-out pair's scores and response lengths (and, where a gold judge is configured,
its verdict) and returns:

- ``accuracy``: the share of pairs the scores order as the labels do;
- ``by_length``: the same by length bucket (the pair's mean response length in tokens, cut at fixed quantiles), so
  a model that ranks only short answers shows;
- ``length_correlation``: the Pearson correlation of score with response length over every held-out response; a
  large value is the length bias that PPO will exploit;
- ``calibration``: the Bradley–Terry probability sigma(r_chosen - r_rejected) as a reliability table: pairs binned by
  the confidence of the model's choice, max(p, 1 - p), with the mean confidence against the share it got right, and
  the expected calibration error (the count-weighted mean gap);
- ``gold_agreement``: the share of pairs on which the scores order the two responses as the gold judge does (pairs
  the judge scores within ``GOLD_MIN_GAP`` of each other are left out, as ``rlhf.demo.agreement`` does), when
  verdicts are given.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

#: Confidence bins of the reliability table: [0.5, 0.6), ..., [0.9, 1.0].
CALIBRATION_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Length buckets: the pairs' mean response lengths cut at these quantiles.
LENGTH_QUANTILES = (0.25, 0.5, 0.75)
#: Pairs whose gold scores differ by less than this are ties for the gold judge.
GOLD_MIN_GAP = 0.01


def reward_model_report(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[int],
                        rejected_lengths: Sequence[int], gold: Sequence[tuple[float, float]] | None = None,
                        ) -> dict[str, Any]:
    """The report of one reward model on ``n`` held-out pairs (each sequence has one entry per pair; ``gold`` holds
    the judge's (chosen, rejected) scores)."""
    n = len(chosen)
    if not n:
        return {}
    margins = [c - r for c, r in zip(chosen, rejected)]
    right = [m > 0 for m in margins]
    report: dict[str, Any] = {"num_pairs": n, "accuracy": sum(right) / n,
                              "by_length": accuracy_by_length(right, chosen_lengths, rejected_lengths),
                              "length_correlation": pearson([*chosen, *rejected],
                                                            [*chosen_lengths, *rejected_lengths])}
    report.update(calibration(margins))
    if gold is not None:
        decided = [(m, g_c - g_r) for m, (g_c, g_r) in zip(margins, gold) if abs(g_c - g_r) >= GOLD_MIN_GAP]
        report["gold_pairs"] = len(decided)
        report["gold_agreement"] = (sum((m > 0) == (g > 0) for m, g in decided) / len(decided)) if decided else None
    return report


def accuracy_by_length(right: Sequence[bool], chosen_lengths: Sequence[int],
                       rejected_lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Accuracy per bucket of the pairs' mean response length: rows of (lowest, highest length, pairs, accuracy)."""
    lengths = [(c + r) / 2 for c, r in zip(chosen_lengths, rejected_lengths)]
    ordered = sorted(lengths)
    cuts = sorted({ordered[min(int(q * len(ordered)), len(ordered) - 1)] for q in LENGTH_QUANTILES})
    buckets: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
    for i, length in enumerate(lengths):
        buckets[sum(length >= cut for cut in cuts)].append(i)
    return [{"min_length": min(lengths[i] for i in rows), "max_length": max(lengths[i] for i in rows),
             "pairs": len(rows), "accuracy": sum(right[i] for i in rows) / len(rows)} for rows in buckets if rows]


def calibration(margins: Sequence[float]) -> dict[str, Any]:
    """The reliability table of the Bradley–Terry probability and the expected calibration error."""
    rows = []
    gap = 0.0
    for low, high in zip(CALIBRATION_EDGES, CALIBRATION_EDGES[1:]):
        picked = []
        for margin in margins:
            p = 1.0 / (1.0 + math.exp(-margin))
            confidence = max(p, 1.0 - p)
            if low <= confidence < high or (high == 1.0 and confidence == 1.0):
                picked.append((confidence, margin > 0))
        if picked:
            mean_confidence = sum(c for c, _ in picked) / len(picked)
            accuracy = sum(r for _, r in picked) / len(picked)
            rows.append({"confidence": [low, high], "pairs": len(picked), "mean_confidence": mean_confidence,
                         "accuracy": accuracy})
            gap += len(picked) * abs(mean_confidence - accuracy)
    return {"calibration": rows, "expected_calibration_error": gap / len(margins)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """The Pearson correlation of ``x`` and ``y``; None when either is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)

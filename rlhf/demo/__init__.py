"""The bundled demo task: a review grammar, its generator, the gold judge, the simulated annotator and the builder.

Standard library only, so importing it is cheap and it runs anywhere the pipeline does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf.demo.annotator import annotate, noiseless_preference, utility
from rlhf.demo.grammar import (
    VOCABULARY,
    Review,
    continue_review,
    generate_review,
    is_grammatical,
    is_sentence,
    sample_cut,
    sentiment_score,
    split_review,
)
from rlhf.demo.judge import JudgeResult, judge, judge_batch, summarise

if TYPE_CHECKING:
    from rlhf.demo.build import DemoSizes, build_demo_datasets

__all__ = [
    "VOCABULARY",
    "DemoSizes",
    "JudgeResult",
    "Review",
    "annotate",
    "build_demo_datasets",
    "continue_review",
    "generate_review",
    "is_grammatical",
    "is_sentence",
    "judge",
    "judge_batch",
    "noiseless_preference",
    "sample_cut",
    "sentiment_score",
    "split_review",
    "summarise",
    "utility",
]


def __getattr__(name: str) -> object:
    # The builder is imported on first use: importing it here would make `python -m rlhf.demo.build` load the
    # module twice (runpy warns about it).
    if name in ("DemoSizes", "build_demo_datasets"):
        from rlhf.demo import build

        return getattr(build, name)
    raise AttributeError(f"module 'rlhf.demo' has no attribute {name!r}")

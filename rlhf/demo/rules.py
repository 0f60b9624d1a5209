"""Rule-based rewards for the demo task: reward functions (`rlhf.rewards`) to train with instead of, or beside, the
learned reward model.

They read a response as whitespace-separated words, as the gold judge does, but know far less than it: a word list
and a sentence count. They do not parse, do not see "not", and do not look for repetition, so a policy can game
them (say "great" in every clause, repeat a sentence); the held-out gold judge shows whether it does.
"""

from __future__ import annotations

from typing import Any

from rlhf.demo.grammar import NEGATIVE_WORDS, POSITIVE_WORDS, SENTENCE_END


def positive_words(prompts: list[Any], responses: list[str]) -> list[float]:
    """(positive − negative words of the lexicon) / (all of them) in each response: in [-1, 1], 0 without any."""
    out = []
    for response in responses:
        words = response.split()
        positive = sum(word in POSITIVE_WORDS for word in words)
        negative = sum(word in NEGATIVE_WORDS for word in words)
        out.append((positive - negative) / (positive + negative) if positive + negative else 0.0)
    return out


def complete_sentences(prompts: list[Any], responses: list[str]) -> list[float]:
    """1 when the response ends a sentence and ends 1 to 3 of them, else 0."""
    out = []
    for response in responses:
        words = response.split()
        ends = words.count(SENTENCE_END)
        out.append(1.0 if words and words[-1] == SENTENCE_END and 1 <= ends <= 3 else 0.0)
    return out

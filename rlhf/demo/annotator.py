"""The simulated annotator that labels the demo's preference pairs.

It reads a response roughly the way a hurried rater would: mostly its sentiment, with a small liking for longer
answers. It never looks at grammar or repetition, and it errs, so a reward model learned from its labels is an
imperfect proxy of the gold judge that a policy can exploit (rambling, repeating positive sentences, word salad).

Utility of a response = SENTIMENT_WEIGHT * sentiment + LENGTH_BONUS_PER_WORD * words, with sentiment the same lexicon
score the gold judge reads and words the response's tokens other than full stops. Each reading adds Gaussian noise
(close calls go either way), then a lapse swaps the label outright. Together they make about 15% of labels disagree
with the annotator's own noiseless preference on pairs like the demo's (measured in the unit tests).
"""

from __future__ import annotations

import random

from rlhf.demo.grammar import SENTENCE_END, sentiment_score

SENTIMENT_WEIGHT = 1.0
LENGTH_BONUS_PER_WORD = 0.005
"""A sentence is about six words, so a four-sentence answer earns ~0.06 over a two-sentence one: it usually wins among
answers of equal sentiment (beyond the reading noise) and never outweighs a positive-versus-negative difference (2.0)."""
READING_NOISE_STD = 0.05
"""Standard deviation of the noise added to each response's utility; flips close calls only."""
LAPSE_RATE = 0.09
"""Chance of swapping the label regardless of the responses."""


def utility(prompt: str, response: str) -> float:
    """The annotator's noiseless liking for ``response`` as a continuation of ``prompt``."""
    prompt_tokens = prompt.split()
    tokens = prompt_tokens + response.split()
    words = sum(1 for t in tokens[len(prompt_tokens) :] if t != SENTENCE_END)
    return SENTIMENT_WEIGHT * sentiment_score(tokens, len(prompt_tokens)) + LENGTH_BONUS_PER_WORD * words


def noiseless_preference(prompt: str, response_a: str, response_b: str) -> str | None:
    """The response the annotator prefers without noise, or None on a tie."""
    a, b = utility(prompt, response_a), utility(prompt, response_b)
    if a == b:
        return None
    return response_a if a > b else response_b


def annotate(prompt: str, response_a: str, response_b: str, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) for two responses to ``prompt``, with the annotator's noise drawn from ``rng``.

    Always draws the same number of values from ``rng``, so a labelled dataset is reproducible row by row.
    """
    noisy_a = utility(prompt, response_a) + rng.gauss(0.0, READING_NOISE_STD)
    noisy_b = utility(prompt, response_b) + rng.gauss(0.0, READING_NOISE_STD)
    prefers_a = noisy_a >= noisy_b
    if rng.random() < LAPSE_RATE:
        prefers_a = not prefers_a
    return (response_a, response_b) if prefers_a else (response_b, response_a)

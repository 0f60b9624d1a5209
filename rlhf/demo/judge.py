"""The gold judge: what a careful reader wants from a continuation of a demo prompt.

It is deterministic and never shown to the policy or the reward model; it only measures. Text is read as whitespace
separated tokens. Demo prompts always end at a word boundary, so the seam between prompt and response is a word
boundary whether or not the response starts with a space.

Sentiment, length and the EOS flag are about what the response contributes; grammar is checked on the text the
response touches (the sentence the prompt cut into, completed, plus every later sentence); repetition is looked for
across prompt + response, counting only repeats that involve the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from rlhf.demo.grammar import SENTENCE_END, clause_spans, is_sentence, sentiment_score

# Weights of the combined score; they sum to 1 so a perfect response scores 1.0.
SENTIMENT_WEIGHT = 0.40
"""Times (1 + sentiment) / 2: negative 0, neutral or mixed 0.2, positive 0.4."""
GRAMMAR_WEIGHT = 0.25
NO_REPETITION_WEIGHT = 0.15
EOS_WEIGHT = 0.10
CONCISE_WEIGHT = 0.10
MIN_CONCISE_SENTENCES = 1
MAX_CONCISE_SENTENCES = 3


@dataclass(frozen=True)
class JudgeResult:
    """The judge's reading of one response and the combined score in [0, 1]."""

    sentiment: float
    """Lexicon sentiment of the response's words in [-1, 1]: (positive − negative) / (positive + negative)."""
    positive: bool
    """sentiment > 0."""
    grammatical: bool
    """The response is non-empty, every sentence it touches parses, and the text ends with a full stop."""
    repetition: bool
    """A clause occurs twice in prompt + response (one occurrence touching the response), or a word is doubled."""
    eos: bool
    """The generation stopped on its own (the caller's flag)."""
    concise: bool
    """The response completes 1 to 3 sentences."""
    num_sentences: int
    """Sentences the response completes (full stops it contains)."""
    combined: float
    """SENTIMENT_WEIGHT * (1 + sentiment) / 2 + GRAMMAR_WEIGHT * grammatical + NO_REPETITION_WEIGHT * (not repetition)
    + EOS_WEIGHT * eos + CONCISE_WEIGHT * concise."""


def _grammatical(tokens: list[str], start: int) -> bool:
    if start == len(tokens) or tokens[-1] != SENTENCE_END:
        return False
    # Back up to the start of the sentence the prompt ended in, so a completion is judged with its beginning.
    begin = start
    while begin > 0 and tokens[begin - 1] != SENTENCE_END:
        begin -= 1
    sentence_start = begin
    for i in range(begin, len(tokens)):
        if tokens[i] == SENTENCE_END:
            if not is_sentence(tuple(tokens[sentence_start : i + 1])):
                return False
            sentence_start = i + 1
    return True


def _repetition(tokens: list[str], start: int) -> bool:
    for i in range(max(start, 1), len(tokens)):
        if tokens[i] == tokens[i - 1]:
            return True
    seen: dict[tuple[str, ...], bool] = {}
    for s, e in clause_spans(tokens):
        key = tuple(tokens[s:e])
        touches_response = e > start
        if key in seen and (touches_response or seen[key]):
            return True
        seen[key] = seen.get(key, False) or touches_response
    return False


def judge(prompt: str, response: str, ended_with_eos: bool) -> JudgeResult:
    """Judge ``response`` as the continuation of ``prompt``; see the module docstring for what each part reads."""
    prompt_tokens = prompt.split()
    response_tokens = response.split()
    tokens = prompt_tokens + response_tokens
    start = len(prompt_tokens)
    sentiment = sentiment_score(tokens, start)
    grammatical = _grammatical(tokens, start)
    repetition = _repetition(tokens, start)
    eos = bool(ended_with_eos)
    num_sentences = response_tokens.count(SENTENCE_END)
    concise = MIN_CONCISE_SENTENCES <= num_sentences <= MAX_CONCISE_SENTENCES
    combined = (
        SENTIMENT_WEIGHT * (1.0 + sentiment) / 2.0
        + GRAMMAR_WEIGHT * grammatical
        + NO_REPETITION_WEIGHT * (not repetition)
        + EOS_WEIGHT * eos
        + CONCISE_WEIGHT * concise
    )
    return JudgeResult(
        sentiment=sentiment,
        positive=sentiment > 0,
        grammatical=grammatical,
        repetition=repetition,
        eos=eos,
        concise=concise,
        num_sentences=num_sentences,
        combined=combined,
    )


def judge_batch(prompts: Sequence[str], responses: Sequence[str], eos_flags: Sequence[bool]) -> list[JudgeResult]:
    """``judge`` over aligned sequences."""
    if not len(prompts) == len(responses) == len(eos_flags):
        raise ValueError(
            f"judge_batch needs aligned inputs, got {len(prompts)} prompts, {len(responses)} responses and "
            f"{len(eos_flags)} eos flags"
        )
    return [judge(p, r, e) for p, r, e in zip(prompts, responses, eos_flags)]


def summarise(results: Sequence[JudgeResult]) -> dict[str, float]:
    """Mean of every field over ``results``: a share for the flags, a mean for the numbers.

    Keys are the field names: positive, grammatical, repetition, eos, concise (shares in [0, 1]) and sentiment,
    num_sentences, combined (means).
    """
    if not results:
        raise ValueError("summarise needs at least one JudgeResult, got none")
    n = len(results)
    return {f.name: sum(float(getattr(r, f.name)) for r in results) / n for f in fields(JudgeResult)}

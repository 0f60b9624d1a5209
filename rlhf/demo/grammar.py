"""The demo's language: vocabulary, sentence templates, a review generator and a fast recogniser.

Surface form: lower case, one space between tokens, and the full stop is a token of its own (``"the lid is flimsy
."``), so splitting on whitespace recovers the tokens exactly. A review is one to six sentences about one product.

Each sentence follows one of ``TEMPLATES``. A template is written in a small pattern language over tokens:

- ``lowercase`` is a literal word (``.`` included), ``UPPERCASE`` a word class from ``WORD_CLASSES``;
- ``SUBJ`` and ``PRODUCT`` are noun phrases (``DET NOUN`` or ``it``); they differ only in what the generator picks
  (an aspect such as "the lid" versus the product itself);
- ``[a b|c]`` is optional (nothing, ``a b`` or ``c``) and ``{a b|c}`` a required choice.

The recogniser accepts exactly the token sequences these patterns expand to, over the word classes; it is laxer than
the generator in what it allows to go together ("this lid", "last morning") because grammar, not sense, is what it
checks. Sentiment comes from a word lexicon (``POSITIVE_WORDS``, ``NEGATIVE_WORDS``); "not" flips the next sentiment
word of its clause.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

Polarity = Literal["positive", "negative", "neutral", "mixed"]
ReviewSentiment = Literal["positive", "negative", "mixed"]

DETERMINERS = ("the", "this", "my")

# Which aspects the generator talks about for each product; the recogniser accepts any noun in any noun slot.
PRODUCT_ASPECTS: dict[str, tuple[str, ...]] = {
    "backpack": ("strap", "zipper", "pocket", "fabric", "handle"),
    "bike": ("seat", "chain", "brake", "frame", "wheel"),
    "blender": ("lid", "motor", "blade", "jar", "button"),
    "camera": ("lens", "sensor", "battery", "screen", "strap"),
    "chair": ("seat", "cushion", "frame", "wheel", "fabric"),
    "charger": ("cable", "plug", "port", "light", "case"),
    "desk": ("surface", "frame", "drawer", "finish", "size"),
    "drill": ("battery", "chuck", "motor", "grip", "trigger"),
    "fan": ("blade", "motor", "remote", "base", "timer"),
    "grill": ("lid", "grate", "burner", "handle", "wheel"),
    "headset": ("microphone", "cushion", "cable", "sound", "battery"),
    "heater": ("fan", "dial", "thermostat", "cord", "timer"),
    "helmet": ("strap", "shell", "visor", "padding", "fit"),
    "jacket": ("zipper", "hood", "fabric", "lining", "pocket"),
    "kettle": ("lid", "handle", "spout", "base", "switch"),
    "keyboard": ("key", "switch", "cable", "backlight", "layout"),
    "lamp": ("shade", "bulb", "switch", "base", "cord"),
    "mattress": ("foam", "cover", "edge", "support", "smell"),
    "microwave": ("door", "timer", "tray", "light", "button"),
    "monitor": ("screen", "stand", "panel", "cable", "menu"),
    "mouse": ("wheel", "button", "sensor", "cable", "grip"),
    "pan": ("handle", "coating", "surface", "lid", "base"),
    "phone": ("screen", "battery", "camera", "speaker", "case"),
    "pillow": ("foam", "cover", "fabric", "filling", "shape"),
    "printer": ("tray", "ink", "driver", "app", "screen"),
    "projector": ("lens", "fan", "remote", "bulb", "picture"),
    "router": ("signal", "antenna", "app", "range", "light"),
    "scale": ("display", "battery", "surface", "app", "button"),
    "speaker": ("sound", "bass", "battery", "button", "app"),
    "stroller": ("wheel", "brake", "canopy", "frame", "basket"),
    "suitcase": ("wheel", "handle", "zipper", "lock", "shell"),
    "tablet": ("screen", "battery", "case", "speaker", "camera"),
    "tent": ("zipper", "pole", "floor", "fabric", "door"),
    "thermos": ("lid", "seal", "cup", "finish", "handle"),
    "toaster": ("lever", "dial", "slot", "tray", "timer"),
    "umbrella": ("canopy", "handle", "frame", "button", "case"),
    "vacuum": ("motor", "filter", "hose", "brush", "battery"),
    "watch": ("strap", "screen", "battery", "clasp", "app"),
}
PRODUCTS = tuple(PRODUCT_ASPECTS)
NOUNS = tuple(sorted(set(PRODUCTS).union(*PRODUCT_ASPECTS.values())))

POSITIVE_ADJECTIVES = (
    "great", "excellent", "good", "amazing", "sturdy", "solid", "reliable", "comfortable", "quiet", "fast",
    "bright", "sharp", "clear", "lightweight", "durable", "powerful", "elegant", "compact", "smooth", "stylish",
    "responsive", "perfect", "wonderful", "fantastic", "handy", "sleek", "crisp", "soft", "roomy", "accurate",
    "efficient", "nice", "lovely", "superb", "affordable",
)  # fmt: skip
NEGATIVE_ADJECTIVES = (
    "terrible", "awful", "bad", "poor", "flimsy", "noisy", "loud", "slow", "dim", "blurry", "heavy", "bulky",
    "fragile", "unreliable", "uncomfortable", "weak", "cheap", "ugly", "stiff", "clunky", "useless", "faulty",
    "overpriced", "disappointing", "horrible", "wobbly", "leaky", "scratchy", "sticky", "dull", "awkward",
    "mediocre", "broken",
)  # fmt: skip
NEUTRAL_ADJECTIVES = (
    "black", "white", "silver", "gray", "red", "blue", "green", "small", "large", "new", "plastic", "metal",
    "round", "square", "simple", "tall", "wide",
)  # fmt: skip
POSITIVE_MANNER = ("well", "perfectly", "flawlessly", "smoothly", "quietly", "reliably", "beautifully")
NEGATIVE_MANNER = ("poorly", "badly", "terribly", "erratically", "noisily", "sluggishly")
POSITIVE_FEELINGS = ("love", "like", "enjoy", "adore", "appreciate")
NEGATIVE_FEELINGS = ("hate", "dislike", "loathe", "despise", "regret")
POSITIVE_MOODS = ("happy", "satisfied", "pleased", "impressed", "delighted", "thrilled")
NEGATIVE_MOODS = ("disappointed", "unhappy", "frustrated", "annoyed", "upset")
FAULT_VERBS = (
    "broke", "leaks", "rattles", "overheats", "squeaks", "wobbles", "failed", "cracked", "stalls", "jams",
    "snapped", "tore", "peeled", "sticks", "buzzes", "flickers", "died",
)  # fmt: skip

WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "DET": DETERMINERS,
    "NOUN": NOUNS,
    "ADJ": POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES,
    "INTENS": ("very", "really", "quite", "so", "pretty", "extremely", "rather", "incredibly", "fairly"),
    # Generic verbs only, so that any product can take any of them ("the kettle works well").
    "VERB": ("works", "runs", "performs", "handles"),
    "MANNER": POSITIVE_MANNER + NEGATIVE_MANNER,
    "FAULT": FAULT_VERBS,
    "FEEL": POSITIVE_FEELINGS + NEGATIVE_FEELINGS,
    "MOOD": POSITIVE_MOODS + NEGATIVE_MOODS,
    # Three time classes so that the generator says "last winter" and "every morning" but not "every winter".
    "TIME_LAST": ("week", "month", "year", "night", "weekend", "spring", "summer", "winter"),
    "TIME_EVERY": ("day", "morning", "evening", "night", "weekend", "week"),
    "TIME_SPAN": ("day", "week", "month", "year"),
    "DAY": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "RELATIVE": ("wife", "husband", "son", "daughter", "mother", "father", "sister", "brother", "friend", "neighbor"),
    "USE": ("cooking", "work", "travel", "school", "gaming", "music", "coffee", "camping", "cleaning", "reading"),
}

# "recommend", "buy" and "worth" carry sentiment only in their templates ("i would not buy it again").
POSITIVE_WORDS = frozenset(POSITIVE_ADJECTIVES + POSITIVE_MANNER + POSITIVE_FEELINGS + POSITIVE_MOODS) | {
    "recommend",
    "buy",
    "worth",
}
NEGATIVE_WORDS = frozenset(NEGATIVE_ADJECTIVES + NEGATIVE_MANNER + NEGATIVE_FEELINGS + NEGATIVE_MOODS + FAULT_VERBS)
NEGATORS = frozenset({"not"})
CONNECTIVES = frozenset({"and", "but"})
# A connective followed by one of these starts a new clause ("... and the lid is ..."), else it joins adjectives.
CLAUSE_OPENERS = frozenset(DETERMINERS) | {"it", "i", "overall"}
SENTENCE_END = "."
_LEXICON: dict[str, int] = {**{w: 1 for w in POSITIVE_WORDS}, **{w: -1 for w in NEGATIVE_WORDS}}
_NP_ROLES = ("SUBJ", "PRODUCT")
_NP_EXPANSIONS = (("DET", "NOUN"), ("it",))


@dataclass(frozen=True)
class _Item:
    """One position of a template: alternatives (each a sequence of symbols), possibly optional."""

    options: tuple[tuple[str, ...], ...]
    optional: bool


_ITEM_RE = re.compile(r"\[[^\]]*\]|\{[^}]*\}|\S+")


def _parse_pattern(pattern: str) -> tuple[_Item, ...]:
    items = []
    for part in _ITEM_RE.findall(pattern):
        if part[0] in "[{":
            options = tuple(tuple(alt.split()) for alt in part[1:-1].split("|"))
            items.append(_Item(options, optional=part[0] == "["))
        else:
            items.append(_Item(((part,),), optional=False))
    return tuple(items)


@dataclass(frozen=True)
class Template:
    """A sentence shape with the sentence polarities it may express and how often the generator uses it."""

    name: str
    pattern: str
    polarities: frozenset[str]
    opener: bool
    """May start a review (its first noun phrase then names the product); the others need "it" to refer back."""
    weight: float
    topic: str | None = None
    """Templates sharing a topic appear at most once per review (one "overall ..." verdict, one purchase story)."""
    items: tuple[_Item, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _parse_pattern(self.pattern))


_POLAR = frozenset({"positive", "negative"})
_MIXED = frozenset({"mixed"})
TEMPLATES: tuple[Template, ...] = (
    Template("copula", "SUBJ is [not] [INTENS] ADJ .", _POLAR | {"neutral"}, True, 3.0),
    Template("copula_pair", "SUBJ is [INTENS] ADJ and [INTENS] ADJ .", _POLAR, True, 1.5),
    Template("copula_contrast", "SUBJ is [INTENS] ADJ but [INTENS] ADJ .", _MIXED, True, 1.5),
    Template("two_clauses", "SUBJ is [INTENS] ADJ and SUBJ is [INTENS] ADJ .", _POLAR, True, 1.0),
    Template("two_clauses_contrast", "SUBJ is [INTENS] ADJ but SUBJ is [INTENS] ADJ .", _MIXED, True, 1.5),
    Template("activity", "SUBJ VERB MANNER .", _POLAR, True, 1.5),
    Template("fault", "SUBJ FAULT [after a TIME_SPAN] .", frozenset({"negative"}), True, 1.0),
    Template("feeling", "i [really] FEEL SUBJ .", _POLAR, True, 1.5),
    Template("mood", "i am [INTENS] MOOD with SUBJ .", _POLAR, True, 1.0),
    Template("recommend", "i would [not] recommend it [to anyone] .", _POLAR, False, 1.5, "recommend"),
    Template("buy_again", "i would [not] buy it again .", _POLAR, False, 1.0, "buy_again"),
    Template("verdict", "overall it is [not] [INTENS] ADJ .", _POLAR, False, 1.5, "overall"),
    Template("overall_mood", "overall i am [INTENS] MOOD .", _POLAR, False, 1.0, "overall"),
    Template("value", "it is [INTENS] ADJ for the money .", _POLAR, False, 1.0, "money"),
    Template("worth", "it is [not] worth the money .", _POLAR, False, 1.0, "money"),
    Template("purchase", "i bought PRODUCT [last TIME_LAST|yesterday] .", frozenset({"neutral"}), True, 2.0, "origin"),
    Template("routine", "i use it every TIME_EVERY .", frozenset({"neutral"}), False, 1.0),
    Template("use", "i use it for USE .", frozenset({"neutral"}), False, 1.0),
    Template("family", "my RELATIVE has one too .", frozenset({"neutral"}), False, 0.7, "family"),
    Template("gift", "i got it as a gift [from my RELATIVE] .", frozenset({"neutral"}), False, 0.7, "origin"),
    Template("arrival", "it arrived {yesterday|today|on DAY} .", frozenset({"neutral"}), False, 0.7, "arrival"),
)
TEMPLATE_BY_NAME = {t.name: t for t in TEMPLATES}


def _literals() -> set[str]:
    words = set()
    for template in TEMPLATES:
        for item in template.items:
            for option in item.options:
                words.update(s for s in option if not s.isupper())
    return words | {"it"}


VOCABULARY: tuple[str, ...] = tuple(sorted(_literals().union(*WORD_CLASSES.values())))


def _word_symbols() -> dict[str, tuple[str, ...]]:
    """Every symbol a word can stand for in a template: itself (as a literal) and each class it belongs to."""
    symbols: dict[str, list[str]] = {word: [word] for word in VOCABULARY}
    for name, words in WORD_CLASSES.items():
        for word in words:
            symbols[word].append(name)
    return {word: tuple(s) for word, s in symbols.items()}


def _expand(items: tuple[_Item, ...]) -> list[tuple[str, ...]]:
    """All symbol sequences of a template, noun phrases expanded."""
    sequences: list[tuple[str, ...]] = [()]
    for item in items:
        choices: list[tuple[str, ...]] = [()] if item.optional else []
        for option in item.options:
            expanded: list[tuple[str, ...]] = [()]
            for symbol in option:
                parts = _NP_EXPANSIONS if symbol in _NP_ROLES else ((symbol,),)
                expanded = [prefix + part for prefix in expanded for part in parts]
            choices.extend(expanded)
        sequences = [prefix + choice for prefix in sequences for choice in choices]
    return sequences


def _compile() -> tuple[dict[tuple[int, str], int], frozenset[int]]:
    """A prefix tree over the symbol sequences of all templates, as a transition table."""
    transitions: dict[tuple[int, str], int] = {}
    accepting = set()
    for template in TEMPLATES:
        for sequence in _expand(template.items):
            state = 0
            for symbol in sequence:
                state = transitions.setdefault((state, symbol), len(transitions) + 1)
            accepting.add(state)
    return transitions, frozenset(accepting)


_WORD_SYMBOLS = _word_symbols()
_TRANSITIONS, _ACCEPTING = _compile()


@lru_cache(maxsize=1 << 16)
def is_sentence(tokens: tuple[str, ...]) -> bool:
    """True when ``tokens`` (full stop included) is one sentence of some template.

    Walks the prefix tree with the set of states reachable so far; a word can match as a literal or as any of its
    classes, so several states may be live at once (at most a handful). Cached because policies repeat sentences.
    """
    states = [0]
    for token in tokens:
        symbols = _WORD_SYMBOLS.get(token)
        if symbols is None:
            return False
        states = [t for s in states for sym in symbols if (t := _TRANSITIONS.get((s, sym))) is not None]
        if not states:
            return False
    return any(s in _ACCEPTING for s in states)


def split_sentences(tokens: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """Cut tokens after each full stop; a trailing run without one is returned as the last, incomplete, part."""
    sentences, start = [], 0
    for i, token in enumerate(tokens):
        if token == SENTENCE_END:
            sentences.append(tuple(tokens[start : i + 1]))
            start = i + 1
    if start < len(tokens):
        sentences.append(tuple(tokens[start:]))
    return sentences


def is_grammatical(text: str) -> bool:
    """True when ``text`` is one or more sentences of the grammar and ends with a full stop."""
    tokens = text.split()
    return bool(tokens) and tokens[-1] == SENTENCE_END and all(is_sentence(s) for s in split_sentences(tokens))


def sentiment_counts(tokens: list[str] | tuple[str, ...], start: int = 0) -> tuple[int, int]:
    """(positive, negative) lexicon words among ``tokens[start:]``, each flipped when a "not" of its clause precedes it.

    Negation is read from the whole sequence, so "the kettle is not" + " great ." counts "great" as negative.
    """
    positive = negative = 0
    negated = False
    for i, token in enumerate(tokens):
        if token in NEGATORS:
            negated = True
            continue
        if token == SENTENCE_END or token in CONNECTIVES:
            negated = False
            continue
        polarity = _LEXICON.get(token)
        if polarity is None:
            continue
        if negated:
            polarity, negated = -polarity, False
        if i >= start:
            if polarity > 0:
                positive += 1
            else:
                negative += 1
    return positive, negative


def sentiment_score(tokens: list[str] | tuple[str, ...], start: int = 0) -> float:
    """(positive − negative) / (positive + negative) over ``tokens[start:]``; 0.0 without sentiment words.

    A ratio rather than a count, so saying "great" three times is no more positive than saying it once.
    """
    positive, negative = sentiment_counts(tokens, start)
    total = positive + negative
    return (positive - negative) / total if total else 0.0


def polarity_of(tokens: list[str] | tuple[str, ...], start: int = 0) -> Polarity:
    """The polarity class of ``tokens[start:]``: which kinds of sentiment words it holds."""
    positive, negative = sentiment_counts(tokens, start)
    if positive and negative:
        return "mixed"
    if positive:
        return "positive"
    return "negative" if negative else "neutral"


def clause_spans(tokens: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the clauses in ``tokens``, without full stops and clause-joining connectives.

    A sentence is split at "and"/"but" only where a new clause follows ("the lid is great and the motor is quiet"),
    not where adjectives are joined ("cheap and flimsy").
    """
    spans, start, n = [], 0, len(tokens)
    for i, token in enumerate(tokens):
        if token == SENTENCE_END or (token in CONNECTIVES and i + 1 < n and tokens[i + 1] in CLAUSE_OPENERS):
            if i > start:
                spans.append((start, i))
            start = i + 1
    if start < n:
        spans.append((start, n))
    return spans


_NEGATABLE_INTENSIFIERS = frozenset({"very", "really", "so"})


def _awkward_negation(tokens: tuple[str, ...]) -> bool:
    """True for negations the generator avoids: "not" with no sentiment word after it in its clause ("the case is not
    black"), or before an intensifier other than very/really/so ("not fairly clunky")."""
    for i, token in enumerate(tokens):
        if token not in NEGATORS:
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else SENTENCE_END
        if following in WORD_CLASSES["INTENS"] and following not in _NEGATABLE_INTENSIFIERS:
            return True
        for later in tokens[i + 1 :]:
            if later == SENTENCE_END or later in CONNECTIVES:
                return True
            if later in _LEXICON:
                break
        else:
            return True
    return False


@dataclass(frozen=True)
class Sentence:
    """A generated sentence: its template and the tokens each template item produced (empty for a skipped option)."""

    template: str
    groups: tuple[tuple[str, ...], ...]

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(token for group in self.groups for token in group)


@dataclass(frozen=True)
class Review:
    """A generated review about ``product`` with the overall sentiment it was generated for."""

    product: str
    sentiment: ReviewSentiment
    sentences: tuple[Sentence, ...]

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(token for sentence in self.sentences for token in sentence.tokens)

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


# Generator settings. Weights are relative; they are sampled with rng.choices in the order written here.
REVIEW_SENTIMENT_WEIGHTS: dict[str, float] = {"positive": 0.40, "negative": 0.33, "mixed": 0.27}
NUM_SENTENCES_WEIGHTS: dict[int, float] = {1: 0.10, 2: 0.22, 3: 0.25, 4: 0.20, 5: 0.13, 6: 0.10}
OPTIONAL_PROB = 0.3
"""Chance that an optional template part ("not", an intensifier, "after a week") is said."""
NEUTRAL_SENTENCE_PROB = 0.25
"""Share of neutral sentences ("i use it for coffee .") in positive and negative reviews."""
MIXED_SENTENCE_WEIGHTS: dict[str, float] = {"positive": 0.35, "negative": 0.35, "mixed": 0.15, "neutral": 0.15}
"""Polarity of each sentence of a mixed review (which is then made to hold both signs)."""
_MAX_TRIES = 200


@dataclass
class _Context:
    """What the review has said so far: used to pick fresh aspects and to avoid repeating a clause."""

    product: str
    used_aspects: set[str] = field(default_factory=set)
    clauses: set[tuple[str, ...]] = field(default_factory=set)
    topics: set[str] = field(default_factory=set)

    def accept(self, sentence: Sentence) -> None:
        tokens = sentence.tokens
        topic = TEMPLATE_BY_NAME[sentence.template].topic
        if topic is not None:
            self.topics.add(topic)
        self.used_aspects.update(t for t in tokens if t in PRODUCT_ASPECTS[self.product])
        self.clauses.update(tokens[s:e] for s, e in clause_spans(tokens))

    def repeats(self, tokens: tuple[str, ...]) -> bool:
        keys = [tokens[s:e] for s, e in clause_spans(tokens)]
        return len(set(keys)) < len(keys) or any(k in self.clauses for k in keys)


def weighted_choice(rng: random.Random, weights: dict) -> object:
    """A key of ``weights`` drawn with probability proportional to its value (dict order fixes the draw)."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _noun_phrase(
    role: str, ctx: _Context, rng: random.Random, names_product: bool, taken: list[str]
) -> tuple[str, ...]:
    """Tokens of a noun phrase: the product when the review opens, else mostly an aspect not yet talked about."""
    if names_product:
        return (rng.choice(("this", "this", "the", "my")), ctx.product)
    if role == "PRODUCT":
        return ("it",) if rng.random() < 0.7 else ("the", ctx.product)
    fresh = [a for a in PRODUCT_ASPECTS[ctx.product] if a not in ctx.used_aspects and a not in taken]
    draw = rng.random()
    if draw < 0.75 and fresh:
        aspect = rng.choice(fresh)
        taken.append(aspect)
        return ("the", aspect)
    if draw < 0.9:
        return ("it",)
    return (rng.choice(("this", "the")), ctx.product)


def _fill(
    template: Template,
    ctx: _Context,
    rng: random.Random,
    opening: bool,
    fixed: tuple[tuple[str, ...], ...] = (),
) -> Sentence:
    """Fill ``template``'s items after the ``fixed`` ones at random (no sentiment control; callers reject)."""
    groups = list(fixed)
    taken = [t for group in fixed for t in group if t in PRODUCT_ASPECTS[ctx.product]]
    noun_phrases = sum(any(s in _NP_ROLES for o in item.options for s in o) for item in template.items[: len(fixed)])
    for item in template.items[len(fixed) :]:
        if item.optional and rng.random() >= OPTIONAL_PROB:
            groups.append(())
            continue
        option = item.options[rng.randrange(len(item.options))]
        tokens: list[str] = []
        for symbol in option:
            if symbol in _NP_ROLES:
                tokens.extend(_noun_phrase(symbol, ctx, rng, opening and noun_phrases == 0, taken))
                noun_phrases += 1
            elif symbol in WORD_CLASSES:
                tokens.append(rng.choice(WORD_CLASSES[symbol]))
            else:
                tokens.append(symbol)
        groups.append(tuple(tokens))
    return Sentence(template.name, tuple(groups))


def _sentence(ctx: _Context, polarity: Polarity, rng: random.Random, opening: bool) -> Sentence:
    """A fresh sentence of the given polarity that repeats no clause of the review so far."""
    candidates = [
        t
        for t in TEMPLATES
        if polarity in t.polarities and (t.opener or not opening) and (t.topic is None or t.topic not in ctx.topics)
    ]
    weights = [t.weight for t in candidates]
    for _ in range(_MAX_TRIES):
        template = rng.choices(candidates, weights=weights)[0]
        for _ in range(20):
            sentence = _fill(template, ctx, rng, opening)
            tokens = sentence.tokens
            if polarity_of(tokens) == polarity and not _awkward_negation(tokens) and not ctx.repeats(tokens):
                ctx.accept(sentence)
                return sentence
    raise RuntimeError(f"no {polarity} sentence found for product {ctx.product!r}; the templates are too narrow")


def _sentence_polarities(sentiment: ReviewSentiment, n: int, rng: random.Random) -> list[Polarity]:
    """Polarity of each sentence of a review: a positive review has positive and some neutral sentences, etc."""
    if sentiment == "mixed":
        if n == 1:
            return ["mixed"]
        draws = [weighted_choice(rng, MIXED_SENTENCE_WEIGHTS) for _ in range(n)]
        if "mixed" not in draws and not {"positive", "negative"} <= set(draws):
            first, second = rng.sample(range(n), 2)
            draws[first], draws[second] = "positive", "negative"
        return draws  # type: ignore[return-value]
    draws = ["neutral" if rng.random() < NEUTRAL_SENTENCE_PROB else sentiment for _ in range(n)]
    if sentiment not in draws:
        draws[rng.randrange(n)] = sentiment
    return draws  # type: ignore[return-value]


def generate_review(
    rng: random.Random,
    sentiment: ReviewSentiment | None = None,
    num_sentences: int | None = None,
    products: tuple[str, ...] = PRODUCTS,
) -> Review:
    """A random review; sentiment and length are drawn from the module's weights unless given."""
    if sentiment is None:
        sentiment = weighted_choice(rng, REVIEW_SENTIMENT_WEIGHTS)  # type: ignore[assignment]
    if num_sentences is None:
        num_sentences = weighted_choice(rng, NUM_SENTENCES_WEIGHTS)  # type: ignore[assignment]
    ctx = _Context(rng.choice(products))
    polarities = _sentence_polarities(sentiment, num_sentences, rng)  # type: ignore[arg-type]
    sentences = tuple(_sentence(ctx, p, rng, opening=i == 0) for i, p in enumerate(polarities))
    return Review(ctx.product, sentiment, sentences)  # type: ignore[arg-type]


SECOND_SENTENCE_CUT_PROB = 0.3
"""Chance that a prompt runs into the second sentence ("i bought this kettle last week . the lid")."""


def sample_cut(review: Review, rng: random.Random) -> int:
    """A token index to cut the review at: inside or right after the first sentence, or inside the second.

    At least one token goes to the prompt and one to the completion.
    """
    lengths = [len(s.tokens) for s in review.sentences]
    total = sum(lengths)
    if len(lengths) >= 2 and rng.random() < SECOND_SENTENCE_CUT_PROB:
        low, high = lengths[0] + 1, lengths[0] + lengths[1]
    else:
        low, high = 1, lengths[0]
    return rng.randint(low, min(high, total - 1))


def split_review(review: Review, cut: int) -> tuple[str, str]:
    """(prompt, completion) with ``prompt + completion == review.text``; the completion starts with its space."""
    tokens = review.tokens
    if not 0 < cut < len(tokens):
        raise ValueError(f"cut must leave tokens on both sides, got {cut} for a review of {len(tokens)} tokens")
    return " ".join(tokens[:cut]), " " + " ".join(tokens[cut:])


def _locate(review: Review, cut: int) -> tuple[int, int]:
    """(sentence index, token offset inside it) of a cut; offset 0 means the cut is at a sentence boundary."""
    offset = 0
    for index, sentence in enumerate(review.sentences):
        if cut < offset + len(sentence.tokens):
            return index, cut - offset
        offset += len(sentence.tokens)
    return len(review.sentences), 0


def _fixed_groups(sentence: Sentence, offset: int) -> tuple[tuple[str, ...], ...]:
    """The template items already begun before ``offset``: kept whole, so "the" fixes "the lid"."""
    fixed, start = [], 0
    for group in sentence.groups:
        if start >= offset:
            break
        fixed.append(group)
        start += len(group)
    return tuple(fixed)


def _compatible(tokens: tuple[str, ...], start: int, sentiment: ReviewSentiment) -> bool:
    positive, negative = sentiment_counts(tokens, start)
    if sentiment == "positive":
        return negative == 0
    if sentiment == "negative":
        return positive == 0
    return True


def continue_review(
    review: Review, cut: int, rng: random.Random, sentiment: ReviewSentiment, num_sentences: int
) -> str:
    """A fresh continuation of ``review``'s first ``cut`` tokens, as a completion string (leading space).

    The continuation completes ``num_sentences`` sentences: the one the prompt cut into (if any), finished within its
    template, then new ones. Its sentiment follows ``sentiment`` where the prompt allows (a prompt ending "is not"
    constrains what follows). The sentences repeat no clause of the prompt.
    """
    if num_sentences < 1:
        raise ValueError(f"num_sentences must be at least 1, got {num_sentences}")
    index, offset = _locate(review, cut)
    ctx = _Context(review.product)
    for sentence in review.sentences[:index]:
        ctx.accept(sentence)
    tokens: list[str] = []
    remaining = num_sentences
    if offset > 0:
        original = review.sentences[index]
        template = TEMPLATE_BY_NAME[original.template]
        fixed = _fixed_groups(original, offset)
        chosen, fallback = None, None
        for _ in range(_MAX_TRIES):
            candidate = _fill(template, ctx, rng, opening=index == 0, fixed=fixed)
            words = candidate.tokens
            if polarity_of(words) not in template.polarities or _awkward_negation(words) or ctx.repeats(words):
                continue
            fallback = fallback or candidate
            if _compatible(words, offset, sentiment):
                chosen = candidate
                break
        completed = chosen or fallback or original
        ctx.accept(completed)
        tokens.extend(completed.tokens[offset:])
        remaining -= 1
    if remaining > 0:
        for polarity in _sentence_polarities(sentiment, remaining, rng):
            tokens.extend(_sentence(ctx, polarity, rng, opening=False).tokens)
    return " " + " ".join(tokens)

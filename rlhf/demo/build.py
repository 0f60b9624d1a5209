"""Build the demo's datasets: a pretraining corpus, SFT pairs, labelled preference pairs, PPO and eval prompts.

Every file is JSON Lines (UTF-8, sorted keys, ``\\n`` line endings) and the same seed gives byte-identical files.
Prompts are the opening words of a review and completions continue them as plain strings: ``prompt + completion``
is the text, the completion starting with the space that separates it from the prompt (" is loud .").

Held-out evaluation: eval prompts come from reviews of ``EVAL_PRODUCTS``, which no SFT, preference or PPO prompt is
about (the corpus covers every product, so the base model knows the words). Eval prompts that still equal a training
prompt (ones cut before the product is named, such as "i bought") are dropped, so held-out prompts skew a little
towards longer ones.

    python -m rlhf.demo.build --out data/demo --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rlhf.demo.annotator import annotate
from rlhf.demo.grammar import (
    PRODUCTS,
    SENTENCE_END,
    Review,
    continue_review,
    generate_review,
    sample_cut,
    split_review,
    split_sentences,
    weighted_choice,
)

logger = logging.getLogger(__name__)

EVAL_PRODUCTS = ("camera", "grill", "helmet", "projector", "thermos", "umbrella")
TRAIN_PRODUCTS = tuple(p for p in PRODUCTS if p not in EVAL_PRODUCTS)

# Candidate continuations for preference pairs. "rambling" answers complete 4-6 sentences and "repeated" ones
# repeat a sentence: the annotator does not penalise either, the gold judge does.
CANDIDATE_KIND_WEIGHTS = {"short": 0.70, "rambling": 0.15, "repeated": 0.15}
CANDIDATE_SENTIMENT_WEIGHTS = {"positive": 0.4, "negative": 0.4, "mixed": 0.2}

SFT_POSITIVE_SHARE_RANGE = (0.40, 0.50)
"""Share of SFT completions the gold judge reads as positive: a mix, so the SFT model is not positive already."""

FILE_NAMES = {
    "corpus": "corpus.jsonl",
    "sft": "sft.jsonl",
    "preferences": "preferences.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
}
SOURCE_NAME = "SOURCE.json"


@dataclass(frozen=True)
class DemoSizes:
    """Rows per file."""

    corpus: int = 20_000
    """Full reviews for pretraining the base model."""
    sft: int = 4_000
    """Prompt → completion pairs cut from reviews."""
    preferences: int = 4_000
    """Prompt, chosen, rejected triples labelled by the simulated annotator."""
    prompts: int = 4_000
    """PPO training prompts."""
    eval_prompts: int = 800
    """Held-out prompts for evaluation."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoSizes.{name} must be a positive integer, got {value!r}")


def _rng(seed: int, part: str) -> random.Random:
    # One stream per file, so resizing one file leaves the others unchanged.
    return random.Random(f"rlhf.demo:{seed}:{part}")


def _with_repeated_sentence(prompt: str, completion: str, rng: random.Random) -> str:
    """Insert a copy of one complete sentence of prompt + completion at a sentence end inside the completion."""
    prompt_tokens = prompt.split()
    tokens = prompt_tokens + completion.split()
    sentences = [s for s in split_sentences(tokens) if s[-1] == SENTENCE_END]
    boundaries = [i + 1 for i in range(len(prompt_tokens), len(tokens)) if tokens[i] == SENTENCE_END]
    at = rng.choice(boundaries)
    tokens[at:at] = rng.choice(sentences)
    return " " + " ".join(tokens[len(prompt_tokens) :])


def _candidate(review: Review, cut: int, prompt: str, rng: random.Random) -> str:
    kind = weighted_choice(rng, CANDIDATE_KIND_WEIGHTS)
    sentiment = weighted_choice(rng, CANDIDATE_SENTIMENT_WEIGHTS)
    num_sentences = rng.randint(4, 6) if kind == "rambling" else rng.randint(1, 3)
    completion = continue_review(review, cut, rng, sentiment, num_sentences)  # type: ignore[arg-type]
    if kind == "repeated":
        completion = _with_repeated_sentence(prompt, completion, rng)
    return completion


def _prompted_review(rng: random.Random, products: tuple[str, ...]) -> tuple[Review, int, str, str]:
    review = generate_review(rng, products=products)
    cut = sample_cut(review, rng)
    prompt, completion = split_review(review, cut)
    return review, cut, prompt, completion


def make_corpus(seed: int, n: int) -> list[dict[str, str]]:
    rng = _rng(seed, "corpus")
    return [{"text": generate_review(rng).text} for _ in range(n)]


def make_sft(seed: int, n: int) -> list[dict[str, str]]:
    rng = _rng(seed, "sft")
    rows = []
    for _ in range(n):
        _, _, prompt, completion = _prompted_review(rng, TRAIN_PRODUCTS)
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def candidate_pair(rng: random.Random, products: tuple[str, ...] = TRAIN_PRODUCTS) -> tuple[str, str, str]:
    """(prompt, first, second): a prompt about one of ``products`` and two different candidate continuations, as
    the preference data pairs them before the annotator labels them."""
    review, cut, prompt, _ = _prompted_review(rng, products)
    first = _candidate(review, cut, prompt, rng)
    second = _candidate(review, cut, prompt, rng)
    while second == first:
        second = _candidate(review, cut, prompt, rng)
    return prompt, first, second


def make_preferences(seed: int, n: int) -> list[dict[str, str]]:
    rng, annotator_rng = _rng(seed, "preferences"), _rng(seed, "annotator")
    rows = []
    for _ in range(n):
        prompt, first, second = candidate_pair(rng, TRAIN_PRODUCTS)
        chosen, rejected = annotate(prompt, first, second, annotator_rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_prompts(seed: int, n: int) -> list[dict[str, str]]:
    rng = _rng(seed, "prompts")
    return [{"prompt": _prompted_review(rng, TRAIN_PRODUCTS)[2]} for _ in range(n)]


def make_eval_prompts(seed: int, n: int, training_prompts: set[str]) -> list[dict[str, str]]:
    rng = _rng(seed, "eval_prompts")
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        prompt = _prompted_review(rng, EVAL_PRODUCTS)[2]
        if prompt not in training_prompts:
            rows.append({"prompt": prompt})
    return rows


def _jsonl(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_demo_datasets(out_dir: Path, seed: int = 0, sizes: DemoSizes = DemoSizes()) -> dict[str, Path]:
    """Write the demo datasets and ``SOURCE.json`` (seed, sizes, sha256 per file) into ``out_dir``.

    Returns the path of each file by key: corpus, sft, preferences, prompts, eval_prompts and source.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("generating demo datasets (seed %d) into %s", seed, out_dir)
    datasets = {
        "corpus": make_corpus(seed, sizes.corpus),
        "sft": make_sft(seed, sizes.sft),
        "preferences": make_preferences(seed, sizes.preferences),
        "prompts": make_prompts(seed, sizes.prompts),
    }
    training_prompts = {row["prompt"] for key in ("sft", "preferences", "prompts") for row in datasets[key]}
    datasets["eval_prompts"] = make_eval_prompts(seed, sizes.eval_prompts, training_prompts)
    leaked = training_prompts.intersection(row["prompt"] for row in datasets["eval_prompts"])
    if leaked:
        raise RuntimeError(f"{len(leaked)} eval prompts also appear in training prompts, e.g. {sorted(leaked)[0]!r}")

    paths: dict[str, Path] = {}
    files: dict[str, dict[str, object]] = {}
    for key, rows in datasets.items():
        data = _jsonl(rows)
        path = out_dir / FILE_NAMES[key]
        _write_atomic(path, data)
        paths[key] = path
        files[path.name] = {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    source = {"generator": "rlhf.demo.build", "seed": seed, "sizes": asdict(sizes), "files": files}
    paths["source"] = out_dir / SOURCE_NAME
    _write_atomic(paths["source"], (json.dumps(source, sort_keys=True, indent=2) + "\n").encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    for f in fields(DemoSizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, help=f"rows in {f.name} (default: {f.default})")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(DemoSizes) if getattr(args, f.name) is not None}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = build_demo_datasets(args.out, seed=args.seed, sizes=DemoSizes(**overrides))
    source = json.loads(paths["source"].read_text(encoding="utf-8"))
    for name, info in source["files"].items():
        print(f"{name:20s} {info['rows']:7d} rows {info['bytes']:10d} bytes")


if __name__ == "__main__":
    main()

"""How well a learned reward model agrees with the gold judge on fresh pairs of the SFT model's own samples.

For each held-out prompt the SFT model samples two responses (temperature 1 and at most 48 new tokens unless
``--temperature`` / ``--max-new-tokens`` say otherwise, e.g. the demo PPO's 0.5 and 24; an explicit generation config;
stop at the stop token); a pair counts when the gold judge's combined scores differ by more than ``min_gap``, and agreement
is the share of those pairs the reward model orders the same way. With ``--pairs generator`` the pairs are fresh
ones from the preference data's own generator instead (prompts about the held-out products, which no training row is
about; no SFT model needed): how well the reward model learned the distribution it was trained on, as the gold judge
sees it.

    python -m rlhf.demo.agreement --sft runs/demo/sft --reward runs/demo/reward
    python -m rlhf.demo.agreement --sft runs/demo/sft --reward runs/demo/reward --temperature 0.5 --max-new-tokens 24
    python -m rlhf.demo.agreement --pairs generator --reward runs/demo/reward
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhf.demo.judge import JudgeResult, judge


def pair_agreement(gold: Sequence[tuple[float, float]], scores: Sequence[tuple[float, float]],
                   min_gap: float = 0.01) -> tuple[float, int]:
    """Share of pairs (with a gold gap above ``min_gap``) that ``scores`` order like ``gold``; and their count."""
    counted = agreed = 0
    for (g_a, g_b), (s_a, s_b) in zip(gold, scores):
        if abs(g_a - g_b) <= min_gap:
            continue
        counted += 1
        agreed += (g_a > g_b) == (s_a > s_b)
    return (agreed / counted if counted else float("nan")), counted


def summarise_pairs(judged: Sequence[tuple[JudgeResult, JudgeResult]], scores: torch.Tensor,
                    min_gap: float) -> dict[str, float]:
    """Agreement with the gold judge's combined score and with its sentiment alone, for pairs judged as ``judged``
    and scored as ``scores`` ([2 * pairs]: both responses of a pair next to each other)."""
    flat = scores.tolist()
    pairs = list(zip(flat[0::2], flat[1::2]))
    combined, n = pair_agreement([(a.combined, b.combined) for a, b in judged], pairs, min_gap)
    sent, n_sent = pair_agreement([(a.sentiment, b.sentiment) for a, b in judged], pairs, min_gap)
    return {"agreement_combined": combined, "pairs": n, "agreement_sentiment": sent, "pairs_sentiment": n_sent}


@torch.inference_mode()
def sample_responses(model_dir: str | Path, prompts: Sequence[str], *, seed: int, max_new_tokens: int = 48,
                     temperature: float = 1.0, batch_size: int = 64) -> list[tuple[list[int], list[int], str, bool]]:
    """(prompt ids, response ids, response text, stopped) for each prompt, sampled at ``temperature`` without
    top-k or top-p."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf.text import TextContract

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    contract = TextContract.from_tokenizer(tokenizer)
    # Explicit sampling settings: the checkpoint's generation_config.json must not change what is measured.
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=list(contract.stop_token_ids), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [contract.prompt_ids(p) for p in prompts[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]
        for prompt_ids, row in zip(chunk, generated.tolist()):
            cut = contract.first_stop(row)
            response = row[: cut + 1] if cut is not None else row
            text, stopped = contract.decode_response(response)
            out.append((prompt_ids, response, text, stopped))
    return out


def gold_agreement(sft_dir: str | Path, prompts: Sequence[str], score: Callable[[list[list[int]]], torch.Tensor],
                   *, seed: int = 0, min_gap: float = 0.01, temperature: float = 1.0,
                   max_new_tokens: int = 48) -> dict[str, float]:
    """Agreement of ``score`` (token-id sequences -> scores) with the gold judge on two samples per prompt."""
    sampling = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    first = sample_responses(sft_dir, prompts, seed=seed, **sampling)
    second = sample_responses(sft_dir, prompts, seed=seed + 1, **sampling)
    judged = [(judge(prompt, a[2], a[3]), judge(prompt, b[2], b[3])) for prompt, a, b in zip(prompts, first, second)]
    scores = score([seq for a, b in zip(first, second) for seq in (a[0] + a[1], b[0] + b[1])])
    return summarise_pairs(judged, scores, min_gap)


def generator_agreement(score: Callable[[list[tuple[str, str]]], torch.Tensor], num_pairs: int, *, seed: int = 0,
                        min_gap: float = 0.01) -> dict[str, float]:
    """Agreement of ``score`` ((prompt, response) texts -> scores) with the gold judge on ``num_pairs`` fresh
    candidate pairs from the demo's preference generator, about the held-out products. Every candidate is a
    finished review (ended with EOS)."""
    from rlhf.demo.build import EVAL_PRODUCTS, candidate_pair

    rng = random.Random(f"rlhf.demo.agreement:{seed}")
    triples = [candidate_pair(rng, EVAL_PRODUCTS) for _ in range(num_pairs)]
    judged = [(judge(p, a, True), judge(p, b, True)) for p, a, b in triples]
    return summarise_pairs(judged, score([(p, r) for p, a, b in triples for r in (a, b)]), min_gap)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.models import is_encoder, score_sequences
    from rlhf.text import RewardText

    parser = argparse.ArgumentParser(prog="python -m rlhf.demo.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", choices=["sft", "generator"], default="sft",
                        help="two SFT samples per held-out prompt (default), or fresh pairs from the generator")
    parser.add_argument("--sft", help="the SFT output that samples the pairs (--pairs sft)")
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", default="data/demo/eval_prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=500, help="held-out prompts, or generator pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the SFT pairs")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response length limit of the SFT pairs")
    args = parser.parse_args(argv)
    if args.pairs == "sft" and not args.sft:
        parser.error("--pairs sft needs --sft (the SFT output whose samples are compared)")
    if args.temperature <= 0 or args.max_new_tokens < 1:
        parser.error(f"--temperature must be > 0 and --max-new-tokens >= 1 (got {args.temperature}, "
                     f"{args.max_new_tokens})")
    scorer = AutoModelForSequenceClassification.from_pretrained(args.reward).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.reward)
    pad = tokenizer.pad_token_id

    def score_ids(seqs: list[list[int]]) -> torch.Tensor:
        return score_sequences(scorer, seqs, pad_token_id=pad)

    if args.pairs == "generator":
        text = RewardText.for_model(tokenizer, is_encoder=is_encoder(args.reward))  # as reward training reads it
        result = generator_agreement(lambda texts: score_ids([text.ids(p, r) for p, r in texts]), args.num_prompts,
                                     seed=args.seed)
    else:
        with open(args.prompts, encoding="utf-8") as handle:
            prompts = [json.loads(line)["prompt"] for line in handle][: args.num_prompts]
        result = gold_agreement(args.sft, prompts, score_ids, seed=args.seed, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

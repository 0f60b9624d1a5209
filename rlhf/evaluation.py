"""Held-out evaluation of a policy: generate on held-out prompts, score with the reward model, the reward functions
(and, on the demo task, the gold judge), and measure the KL to the reference.

Used by the PPO stage every few updates and at the end, and by the evaluation stage. Each process evaluates the
prompts whose indices it is given; :func:`summarise_records` turns the gathered records into metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rlhf.ppo.rollout import GenerationSettings, generate, policy_forward
from rlhf.ppo.sampling import sample_uniforms
from rlhf.rewards import WeightedReward, score_responses
from rlhf.scoring import RewardScorer
from rlhf.signals import StageInterrupted
from rlhf.text import PromptLike, TextContract

#: log-probs of the last R tokens of (input_ids, attention_mask) under some model: the reference.
LogprobFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class EvalPrompts:
    """Held-out prompts as given and as token ids (rendered and truncated by the text contract)."""

    prompts: list[PromptLike]
    prompt_ids: list[list[int]]


def encode_prompts(contract: TextContract, prompts: Sequence[PromptLike], max_prompt_len: int) -> list[list[int]]:
    """Prompt ids by the text contract, keeping the last ``max_prompt_len`` tokens (the end of a prompt is what the
    response continues)."""
    return [contract.prompt_ids(p)[-max_prompt_len:] for p in prompts]


@torch.inference_mode()
def evaluate_policy(
    policy: Any,
    reference_logprobs: LogprobFn,
    scorer: RewardScorer | None,
    prompts: EvalPrompts,
    indices: Sequence[int],
    settings: GenerationSettings,
    *,
    contract: TextContract | None = None,
    rewards: Sequence[WeightedReward] = (),
    seed: int,
    device: Any,
    batch_size: int = 64,
    gold_judge: bool = False,
    progress: str | None = None,
    stop: Any = None,
) -> list[dict[str, Any]]:
    """One record per prompt index: prompt, response text, reward-model score (without a ``scorer``: none), each
    reward function's score (by its metric name, ``reward/<function>``), KL to the reference (sum over the
    response's tokens of log p - log p_ref, at the sampling temperature), length, whether it stopped, and with
    ``gold_judge`` the demo judge's reading. ``contract``: the policy's text contract (default: the scorer's). Samples use the "eval" random stream, so the same prompt index gets the
    same uniforms in every evaluation and on any number of processes. ``progress``: the label of a progress bar (give
    it on the main process only). ``stop``: a `rlhf.signals.StopRequest`, checked before each batch on every
    process; a stop raises `rlhf.signals.StageInterrupted` (nothing is kept: evaluation has no checkpoints)."""
    from tqdm.auto import tqdm

    contract = contract or scorer.policy_contract
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(indices), desc=progress, unit="prompt", leave=False, disable=progress is None)
    for start in range(0, len(indices), batch_size):
        if stop is not None and stop.agreed(device):
            raise StageInterrupted(f"evaluation stopped by a signal after {start} of {len(indices)} prompts; it "
                                   "keeps no partial results, so rerun the stage")
        chunk = list(indices[start:start + batch_size])
        ids = [prompts.prompt_ids[i] for i in chunk]
        uniforms = sample_uniforms(seed, "eval", chunk, settings.max_new_tokens)
        rollout = generate(policy, ids, uniforms, settings, device)
        r = rollout.response_ids.shape[1]
        mask = rollout.response_mask
        temperature = settings.temperature or 1.0
        logprobs, _ = policy_forward(policy, rollout.input_ids, rollout.attention_mask, r, temperature=temperature)
        ref_logprobs = reference_logprobs(rollout.input_ids, rollout.attention_mask, r)
        kl = ((logprobs - ref_logprobs) * mask).sum(-1).float().cpu()
        responses = rollout.response_lists()
        raw_prompts = [prompts.prompts[i] for i in chunk]
        scores = scorer.score(raw_prompts, ids, responses) if scorer is not None else None
        decoded = [contract.decode_response(response) for response in responses]
        function_scores = score_responses(rewards, raw_prompts, [text for text, _ in decoded])
        for row, index in enumerate(chunk):
            text, stopped = decoded[row]
            record = {"index": index, "prompt": raw_prompts[row], "response": text,
                      **({"score": scores[row].item()} if scores is not None else {}),
                      **{name: values[row].item() for name, values in function_scores.items()},
                      "kl": kl[row].item(), "length": len(responses[row]), "stopped": bool(stopped)}
            if gold_judge:
                from rlhf.demo.judge import judge

                verdict = judge(str(raw_prompts[row]), text, stopped)
                record.update({"gold_combined": verdict.combined, "gold_positive": verdict.positive,
                               "gold_grammatical": verdict.grammatical, "gold_repetition": verdict.repetition,
                               "gold_concise": verdict.concise})
            records.append(record)
        bar.update(len(chunk))
    bar.close()
    return records


def summarise_records(records: Sequence[dict[str, Any]], prefix: str = "eval/") -> dict[str, float]:
    """Means over the records: reward-model score (when scored), KL, length, stop (EOS) rate and, when present,
    each reward function's score and the gold judge's parts."""
    if not records:
        return {}
    n = len(records)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in records) / n

    out = {f"{prefix}score_mean": mean("score")} if "score" in records[0] else {}
    out.update({f"{prefix}kl": mean("kl"), f"{prefix}response_len": mean("length"),
                f"{prefix}eos_rate": mean("stopped"), f"{prefix}num_prompts": float(n)})
    out.update({f"{prefix}{key}": mean(key) for key in records[0] if key.startswith("reward/")})
    for key in ("gold_combined", "gold_positive", "gold_grammatical", "gold_repetition", "gold_concise"):
        if key in records[0]:
            out[f"{prefix}{key}"] = mean(key)
    return out

"""TRL 0.28.0's ``PPOTrainer`` trained once for ``benchmarks/quality_vs_trl.py``, which writes the job file, runs this
script with ``.venv-trl/bin/python`` and evaluates the saved policy with our own evaluation code. Prints one JSON line
on stdout; TRL's and transformers' output goes to stderr.

    .venv-trl/bin/python benchmarks/trl_quality_run.py --job JOB.json --seed 0 --output DIR

The job file (written by ``quality_vs_trl.py``) holds:

* ``sft``: the SFT output, loaded twice: the trained policy and the frozen reference;
* ``reward``: the reward output as trained; the value model starts from it, as our critic does;
* ``reward_normalised``: the same reward model with its head rescaled so that it outputs
  ``(score - mean) / std`` of the reward stage's ``reward_stats.json``, which is what our PPO optimises; TRL scores
  with it;
* ``train_prompt_ids``: the training prompts as our text contract encodes them (BOS + prompt tokens, the last
  ``rollout.max_prompt_len`` kept), so both trainers sample from identical prompt ids (left-padded here);
* ``config``: TRL ``PPOConfig`` arguments carrying our values for every hyperparameter both trainers have;
* ``probes``: a few (prompt ids, response ids) pairs; their TRL-side scores and log-probs are reported back so the
  caller can check that transformers 4.57 reads our transformers-5 checkpoints and the rescaled head as we do.

Writes ``DIR/policy`` (the trained policy, safetensors, with the SFT tokenizer) and ``DIR/trl_log.jsonl`` (TRL's
metrics of every update).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import trl.experimental.ppo.ppo_trainer as ppo_module
from datasets import Dataset
from transformers import (
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
    set_seed,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.utils import get_reward

#: What TRL derives from the batch arguments, reported back so the caller can check the batch arithmetic.
DERIVED = ("batch_size", "mini_batch_size", "local_mini_batch_size", "num_total_batches")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="the job file written by quality_vs_trl.py")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True, help="where policy/ and trl_log.jsonl go")
    return parser.parse_args(argv)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    # Our checkpoints name transformers 5's "TokenizersBackend" class, which 4.57 lacks; the fast tokenizer class reads
    # the same tokenizer.json (4.57 warns about the class name, nothing else differs).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # TRL finds the end of a response at its first pad token: padding with EOS would cut the EOS off every score.
        raise SystemExit(f"{path}: TRL needs a pad token distinct from EOS; this tokenizer pads with "
                         f"{tokenizer.pad_token!r}")
    return tokenizer


def load_checked(cls: type, path: str, **kwargs: Any) -> torch.nn.Module:
    """``cls.from_pretrained`` in float32, refusing a load that leaves any weight missing or unused: a config or
    weight name that transformers 4.57 reads differently from the transformers 5 that wrote it would show up here
    rather than as a quietly re-initialised layer."""
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"transformers {version('transformers')} does not load {path} cleanly: {problems}")
    return model


@torch.no_grad()
def probe(policy: GPT2LMHeadModel, reward_model: GPT2ForSequenceClassification, probes: list[dict[str, list[int]]],
          pad_token_id: int, temperature: float) -> dict[str, list[float]]:
    """For each probe, one row at a time (no padding): the sum of the response's log-probs under ``policy`` at
    ``temperature`` through TRL's own ``forward``, and the reward model's score through TRL's ``get_reward``."""
    logprob_sums, scores = [], []
    for item in probes:
        prompt, response = item["prompt_ids"], item["response_ids"]
        ids = torch.tensor([prompt + response])
        context = len(prompt)
        logits = ppo_module.forward(policy, ids, pad_token_id).logits[:, context - 1:-1] / (temperature + 1e-7)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, context:, None]).squeeze(-1)
        logprob_sums.append(logprobs.sum().item())
        scores.append(get_reward(reward_model, ids, pad_token_id, context)[1].item())
    return {"logprob_sums": logprob_sums, "scores": scores}


class MetricsLog(TrainerCallback):
    """TRL's metrics of every update (``objective/scores``, ``objective/kl``, ...), one JSON row each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs:
            self.rows.append({"update": state.global_step, **logs})
            with self.path.open("a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    job = json.loads(args.job.read_text())
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "trl_log.jsonl").unlink(missing_ok=True)
    set_seed(args.seed)
    tokenizer = load_tokenizer(job["sft"])

    policy = load_checked(GPT2LMHeadModel, job["sft"])
    reference = load_checked(GPT2LMHeadModel, job["sft"])
    reward_model = load_checked(GPT2ForSequenceClassification, job["reward_normalised"], num_labels=1)
    value_model = load_checked(GPT2ForSequenceClassification, job["reward"], num_labels=1)
    checks = probe(reference, reward_model, job["probes"], tokenizer.pad_token_id, job["config"]["temperature"])

    prompt_ids = job["train_prompt_ids"]
    config = PPOConfig(
        output_dir=str(args.output / "trl-output"),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        num_sample_generations=0,
        seed=args.seed,
        **job["config"],
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=Dataset.from_dict({"input_ids": prompt_ids}),
        # TRL builds an eval dataloader whether or not it samples; num_sample_generations=0 never uses it.
        eval_dataset=Dataset.from_dict({"input_ids": prompt_ids[:config.per_device_eval_batch_size]}),
    )
    log = MetricsLog(args.output / "trl_log.jsonl")
    trainer.add_callback(log)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    steps = [0]
    optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))

    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start

    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    trained.save_pretrained(args.output / "policy", safe_serialization=True)
    tokenizer.save_pretrained(args.output / "policy")
    updates = [row for row in log.rows if "objective/scores" in row]
    first, last = (updates[0], updates[-1]) if updates else ({}, {})
    keep = ("objective/scores", "objective/kl", "objective/rlhf_reward", "val/num_eos_tokens", "policy/approxkl_avg")
    return {
        "seed": args.seed,
        "train_s": round(train_s, 1),
        "policy": str(args.output / "policy"),
        # Every argument the job set, as TRL holds it after building the trainer, and what it derived from them.
        "config": {key: getattr(config, key) if not hasattr(getattr(config, key), "value")
                   else getattr(config, key).value for key in [*job["config"], "seed", *DERIVED]},
        "stop_token_id": trainer.stop_token_id,
        "optimizer_steps": steps[0],
        "updates_logged": len(updates),
        "first_update": {k: first.get(k) for k in keep},
        "last_update": {k: last.get(k) for k in keep},
        "probes": checks,
        "versions": {name: version(name) for name in ("trl", "transformers", "accelerate", "torch")},
    }


def main(argv: list[str] | None = None) -> None:
    from trl_baseline import print_result  # beside this file; runs in the same TRL virtualenv

    print_result(run, parse_args(argv))


if __name__ == "__main__":
    main()

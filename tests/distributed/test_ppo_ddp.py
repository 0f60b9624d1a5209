"""PPO on two CPU processes (torchrun, gloo): each sample's random stream is keyed by its global index, the batch
statistics and token counts are all-reduced, every process trains on its share of the same global minibatches and
the losses are token sums over the global count, so two processes produce the rollouts, losses and weights of one
process on the same global batch, with the demo's 2 epochs of 2 minibatches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import ZERO3_ENV, demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.launcher import REPO_ROOT, default_config_path
from rlhf.tracking import read_metrics, read_samples
from stages import ppo

pytestmark = pytest.mark.distributed


def _overrides(root, name, sft, rm, prompts, eval_prompts):
    return [f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
            f"data.path={prompts}", f"data.eval_path={eval_prompts}", "checks.min_eos_rate=0", "rollout.batch_size=8",
            "rollout.max_new_tokens=8", "rollout.score_norm=first_rollout", "ppo.num_updates=1", "ppo.ppo_epochs=2",
            "ppo.num_minibatches=2", "ppo.micro_batch_size=2", "eval.num_prompts=8", "eval.gold_judge=false",
            "optim.lr_scheduler=constant", "samples_every=1",
            # Adam's first step is lr * g / (|g| + eps): with a small eps it is lr * sign(g), and float noise in
            # near-zero gradients flips signs; with eps = 1 the step is proportional to the gradient.
            "optim.learning_rate=0.1", "optim.adam_epsilon=1.0"]


#: Micro-batches packed by tokens, a budget of one to three rows: the processes' packings differ, and each runs as
#: many passes as the one that needs the most (under ZeRO-3 a forward is a collective: without that, this run hangs).
TOKEN_BUDGET = ["rollout.max_prompt_len=24", "ppo.micro_batch_tokens=48"]


@pytest.mark.parametrize("engine, estimator", [("ddp", "gae"), ("zero3", "gae"), ("ddp", "grpo"), ("ddp", "rloo"),
                                               ("ddp", "gae-tokens"), ("zero3", "gae-tokens")])
def test_two_processes_give_the_rollouts_losses_and_weights_of_one(tmp_path, engine, estimator):
    """With a critic-free estimator each process holds whole groups (2 responses per prompt here)."""

    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", sft, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 80))
    eval_prompts = write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval_prompts.jsonl", 12))
    args = (sft, rm, prompts, eval_prompts)
    extra = ([] if estimator == "gae" else TOKEN_BUDGET if estimator == "gae-tokens"
             else [f"ppo.advantage_estimator={estimator}", "rollout.samples_per_prompt=2"])

    # accelerate ignores DeepSpeed when told to use the CPU; DeepSpeed finds the CPU by itself.
    env = dict(os.environ, OMP_NUM_THREADS="1", **(ZERO3_ENV if engine == "zero3" else {"ACCELERATE_USE_CPU": "1"}))
    port = {("ddp", "gae"): "29519", ("zero3", "gae"): "29521", ("ddp", "grpo"): "29523",
            ("ddp", "rloo"): "29525", ("ddp", "gae-tokens"): "29527",
            ("zero3", "gae-tokens"): "29529"}[engine, estimator]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(REPO_ROOT / "launch" / "ppo.py"), *_overrides(tmp_path, "two", *args), *extra]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two" / "ppo"
    assert read_manifest(two)["num_processes"] == 2
    assert read_manifest(two)["zero_stage"] == (3 if engine == "zero3" else 0)

    # The launcher starts from the demo config; so does the one-process run.
    one = ppo.run(load_config(PPOConfig, default_config_path("ppo"), [*_overrides(tmp_path, "one", *args), *extra]))
    row_one, row_two = ([r for r in read_metrics(d) if "rollout/kl" in r][0] for d in (one, two))
    # Same rollouts: the batch statistics match and rank 0's samples are the first half of one process's.
    for key in ("rollout/score_mean", "rollout/kl", "rollout/response_len", "rollout/eos_rate",
                "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl"):
        if key == "ppo/value_loss" and not estimator.startswith("gae"):
            assert key not in row_two and key not in row_one
            continue
        assert row_two[key] == pytest.approx(row_one[key], abs=1e-4), key
    # The same global batch is the same work: the model FLOPs summed over the processes are one process's.
    for key in ("perf/flops_generate", "perf/flops_score", "perf/flops_train"):
        assert row_two[key] == row_one[key] > 0, key
    assert 0 < row_two["perf/utilisation"] <= 1
    # ZeRO-3 gathers the policy's weights once for the whole rollout, not once per generated token (before they were
    # held for it: 9.8 times for 8 tokens), counted at DeepSpeed's communication backend; training gathers too.
    if engine == "zero3":
        assert row_two["perf/weight_gathers_generate"] == pytest.approx(1.0, abs=0.05)
        assert row_two["perf/weight_gathers_train"] > 0 and row_two["perf/weight_gathers_score"] > 0
    else:
        assert "perf/weight_gathers_generate" not in row_two
    # Model state per process, measured: under DDP each process holds all of it; ZeRO-3 shards it in two.
    memory_one, memory_two = (read_manifest(d)["memory_mib"] for d in (one, two))
    assert len(memory_two["peak_rss"]) == 2 and all(m > 0 for m in memory_two["peak_rss"])

    def model_state(memory, rank):
        return sum(memory[key][rank] for key in ("trained_weights", "optimizer", "reference_weights", "reward_weights"))

    shares = [model_state(memory_two, rank) / model_state(memory_one, 0) for rank in (0, 1)]
    assert all(share <= 0.55 for share in shares) if engine == "zero3" else shares == [1.0, 1.0], shares
    samples_one = [s["response"] for s in read_samples(one) if s["table"] == "rollout_samples"]
    samples_two = [s["response"] for s in read_samples(two) if s["table"] == "rollout_samples"]
    assert samples_two == samples_one[: len(samples_two)] and len(samples_two) == 4
    # The held-out evaluation splits its prompts across ranks and gathers every record.
    assert read_manifest(two)["metrics"]["final/num_prompts"] == 8
    for part in ("policy", "value") if estimator.startswith("gae") else ("policy",):
        a, b = load_file(one / part / "model.safetensors"), load_file(two / part / "model.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)

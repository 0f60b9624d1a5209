"""PPO with LoRA adapters under DeepSpeed ZeRO-3 on two CPU processes (torchrun, gloo). With LoRA the reference is
the trained engine with its adapters disabled, so rollout and scoring run the engine's own weights: the weights
ZeRO-3 gathers there must still be usable by the training forward of every later update (the adapters and the other
small parameters stay gathered between passes), and the run must match one process on the same global batches."""

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
from rlhf.tracking import read_metrics
from stages import ppo

pytestmark = pytest.mark.distributed

UPDATES = 4


def _overrides(root, name, sft, rm, prompts):
    """Four updates of one optimiser step each (as the scale benchmark's runs take), adapters saved as such."""
    return [f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
            f"data.path={prompts}", "data.eval_path=null", "data.eval_fraction=0.1", "eval.num_prompts=4",
            "eval.gold_judge=false", "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=6",
            "rollout.score_norm=first_rollout", f"ppo.num_updates={UPDATES}", "ppo.ppo_epochs=1",
            "ppo.num_minibatches=1", "ppo.micro_batch_size=4", "peft.method=lora", "peft.lora_r=4",
            "peft.save=adapter", "optim.lr_scheduler=constant", "samples_every=1000",
            # As in test_ppo_ddp: with Adam's eps = 1 a step is proportional to the gradient, not lr * sign(g).
            "optim.learning_rate=0.1", "optim.adam_epsilon=1.0"]


def test_lora_under_zero3_trains_every_update_like_one_process(tmp_path):
    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", sft, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 60))
    args = (sft, rm, prompts)

    env = dict(os.environ, OMP_NUM_THREADS="1", **ZERO3_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(REPO_ROOT / "launch" / "ppo.py"), *_overrides(tmp_path, "two", *args)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # The first error line of either process, then the launcher's summary.
    assert done.returncode == 0, "\n".join([*[line for line in done.stderr.splitlines() if "Error:" in line][:1],
                                             done.stderr[-2000:]])
    two = tmp_path / "two" / "ppo"
    assert read_manifest(two)["status"] == "complete"
    assert read_manifest(two)["num_processes"] == 2 and read_manifest(two)["zero_stage"] == 3

    one = ppo.run(load_config(PPOConfig, default_config_path("ppo"), _overrides(tmp_path, "one", *args)))
    rows_one, rows_two = ([r for r in read_metrics(d) if "rollout/kl" in r] for d in (one, two))
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, UPDATES + 1))
    for row_one, row_two in zip(rows_one, rows_two):
        for key in ("rollout/score_mean", "rollout/kl", "rollout/response_len", "ppo/policy_loss",
                    "ppo/value_loss", "ppo/entropy", "ppo/approx_kl"):
            assert row_two[key] == pytest.approx(row_one[key], abs=1e-4), (row_two["step"], key)

    # The adapters trained (LoRA's B starts at zero) and hold what one process's do.
    a, b = (load_file(d / "policy" / "adapter_model.safetensors") for d in (one, two))
    lora_b = [key for key in a if "lora_B" in key]
    assert lora_b and a.keys() == b.keys()
    assert all(b[key].abs().max() > 0 for key in lora_b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)

"""SIGTERM during SFT or reward training saves a checkpoint and exits with status 75; resume then finishes the run
where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import DPOConfig, RewardConfig, SFTConfig, load_config
from rlhf.launcher import REPO_ROOT, default_config_path
from rlhf.signals import EXIT_INTERRUPTED
from rlhf.tracking import read_metrics
from stages import dpo, reward, sft

STAGES = {"sft": (sft, SFTConfig, "sft.jsonl"), "reward": (reward, RewardConfig, "preferences.jsonl"),
          "dpo": (dpo, DPOConfig, "preferences.jsonl")}


def _overrides(root, name, model, data):
    return [f"run_dir={root / name}", f"model.name_or_path={model}", f"data.path={data}", "data.eval_fraction=0",
            "data.max_length=256", "train.max_steps=40", "train.batch_size=8", "train.micro_batch_size=8",
            "logging.log_every=1", "optim.learning_rate=1e-3"]


def _wait_for_step(metrics, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize("stage", ["sft", "reward", pytest.param("dpo", marks=pytest.mark.slow)])
def test_sigterm_saves_checkpoint_and_resume_finishes(tmp_path, stage):
    module, config_cls, data_name = STAGES[stage]
    model = save_tiny_causal_lm(tmp_path / "base", plain_tokenizer())
    data = write_jsonl(tmp_path / data_name, demo_rows(data_name, 64))
    overrides = _overrides(tmp_path, "cut", model, data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / f"{stage}.py"), *overrides], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    out = tmp_path / "cut" / stage
    _wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "interrupted:" in stderr and "checkpoint.resume=true" in stderr and "Traceback" not in stderr
    assert read_manifest(out) is None  # not complete: nothing downstream may use it
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved, "no checkpoint was written"
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 3 <= stopped_at < 40

    # The launcher read the stage's demo config under the overrides; so do the resumed and the uninterrupted run.
    config = default_config_path(stage)
    resumed = module.run(load_config(config_cls, config, [*overrides, "checkpoint.resume=true"]))
    assert read_manifest(resumed)["metrics"]["train/steps"] == 40
    straight = module.run(load_config(config_cls, config, _overrides(tmp_path, "straight", model, data)))
    assert read_manifest(resumed)["fingerprint"] == read_manifest(straight)["fingerprint"]
    last = {name: [r for r in read_metrics(d / "metrics.jsonl") if r.get("step") == 40 and "train/loss" in r][-1]
            for name, d in (("resumed", resumed), ("straight", straight))}
    assert last["resumed"]["train/loss"] == pytest.approx(last["straight"]["train/loss"], abs=1e-5)
    weights = {name: load_file(d / "model.safetensors") for name, d in (("resumed", resumed), ("straight", straight))}
    assert all(torch.equal(weights["resumed"][k], weights["straight"][k]) for k in weights["straight"])


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_sigterm_during_ppo_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, estimator):
    from safetensors.torch import load_file
    from support import save_reward_model

    from rlhf.checkpoint import list_checkpoints
    from rlhf.config import PPOConfig
    from stages import ppo

    tokenizer = plain_tokenizer()
    model = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", model, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 80))
    eval_prompts = write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval_prompts.jsonl", 12))

    def overrides(name):
        return [f"run_dir={tmp_path / name}", f"model.name_or_path={model}", f"reward_model.name_or_path={rm}",
                f"data.path={prompts}", f"data.eval_path={eval_prompts}",
                "checks.min_eos_rate=0", "rollout.batch_size=8",
                "rollout.max_new_tokens=8", "rollout.score_norm=none", "ppo.num_updates=60", "ppo.ppo_epochs=1",
                "ppo.num_minibatches=1", "ppo.micro_batch_size=8", "eval.num_prompts=4", "eval.gold_judge=false",
                f"ppo.advantage_estimator={estimator}", f"rollout.samples_per_prompt={1 if estimator == 'gae' else 4}"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "ppo.py"), *overrides("cut")], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    out = tmp_path / "cut" / "ppo"
    _wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    assert "interrupted:" in stderr and "checkpoint.resume=true" in stderr and "Traceback" not in stderr
    assert read_manifest(out) is None
    (stopped_at,) = list_checkpoints(out)
    assert 3 <= stopped_at < 60

    default = REPO_ROOT / "configs" / "ppo" / "demo.yaml"  # what the launcher started from
    resumed = ppo.run(load_config(PPOConfig, default, [*overrides("cut"), "checkpoint.resume=true"]))
    straight = ppo.run(load_config(PPOConfig, default, overrides("straight")))
    for part in ("policy", "value") if estimator == "gae" else ("policy",):
        a, b = (load_file(d / part / "model.safetensors") for d in (resumed, straight))
        assert all(a[k].equal(b[k]) for k in a)

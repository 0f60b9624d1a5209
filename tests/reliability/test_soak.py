"""Soak: 200 tiny PPO updates with a checkpoint every 10, killed (a real SIGKILL, at a seeded random choice of
checkpoints, part-way through writing one or just after it) and resumed each time; the final weights and the logged
metrics equal those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, save_tiny_sft_and_reward, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.launcher import REPO_ROOT, default_config_path
from rlhf.signals import FAULT_ENV
from rlhf.tracking import read_metrics
from stages import ppo

UPDATES, SAVE_EVERY, KILLS = 200, 10, 6

pytestmark = pytest.mark.slow


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "perf/"))} for r in rows]


def test_soak_kill_and_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    sft, rm = save_tiny_sft_and_reward(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 64))

    def overrides(name):
        return [f"run_dir={tmp_path / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
                f"data.path={prompts}", "data.eval_path=null", "data.eval_fraction=0.1", "eval.num_prompts=2",
                "eval.every=50", "eval.gold_judge=false",
                "checks.min_eos_rate=0", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                "rollout.score_norm=none", f"ppo.num_updates={UPDATES}", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
                "ppo.micro_batch_size=4", f"checkpoint.save_every={SAVE_EVERY}", "checkpoint.keep_last=2",
                "logging.log_every=5"]

    rng = random.Random(7)
    kill_at = sorted(rng.sample(range(SAVE_EVERY, UPDATES, SAVE_EVERY), KILLS))
    points = [rng.choice(["checkpoint_write", "after_checkpoint"]) for _ in kill_at]
    out = tmp_path / "soak" / "ppo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for step, point in zip(kill_at, points):
        env[FAULT_ENV] = f"{point}:{step}:kill"
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "ppo.py"), *overrides("soak"),
                               "checkpoint.resume=true"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == -9, f"kill at {point}:{step} did not happen: {proc.stderr[-3000:]}"
        assert read_manifest(out) is None
        newest = list_checkpoints(out)[-1]
        assert newest == (step if point == "after_checkpoint" else step - SAVE_EVERY)

    default = default_config_path("ppo")  # what the launcher starts from
    soaked = ppo.run(load_config(PPOConfig, default, [*overrides("soak"), "checkpoint.resume=true"]))
    straight = ppo.run(load_config(PPOConfig, default, overrides("straight")))

    for part in ("policy", "value"):
        a, b = load_file(soaked / part / "model.safetensors"), load_file(straight / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert comparable(read_metrics(soaked)) == comparable(read_metrics(straight))
    assert max(r.get("step", 0) for r in read_metrics(soaked)) == UPDATES

"""PPO through accelerate's DeepSpeed integration (ZeRO-2 and ZeRO-3) in one CPU process: the engine trains policy
and critic, the reference and reward model run as inference engines, the outputs are gathered into loadable models,
and a run resumes from the engine's checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.launcher import REPO_ROOT
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_trains_saves_and_resumes_under_deepspeed(tmp_path, zero):
    from transformers import AutoModelForCausalLM

    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", sft, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 80))
    eval_prompts = write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval_prompts.jsonl", 12))
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO_ROOT / "configs" / "accelerate" / f"{zero}.yaml"), "--num_processes", "1",
            "--mixed_precision", "no", str(REPO_ROOT / "launch" / "ppo.py"), f"run_dir={tmp_path / 'run'}",
            f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}", f"data.path={prompts}",
            f"data.eval_path={eval_prompts}", "rollout.batch_size=8", "rollout.max_new_tokens=8",
            "rollout.score_norm=none", "ppo.num_minibatches=2", "ppo.micro_batch_size=2", "eval.num_prompts=8",
            "eval.gold_judge=false", "optim.learning_rate=1e-2", "checkpoint.save_every=1"]
    first = subprocess.run([*base, "ppo.num_updates=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "run" / "ppo"
    assert read_manifest(out)["status"] == "complete"
    assert (out / "checkpoints" / "step_2" / "deepspeed").is_dir()

    resumed = subprocess.run([*base, "ppo.num_updates=3", "checkpoint.resume=true"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and list_checkpoints(out) == [2, 3]
    assert [r["step"] for r in read_metrics(out) if "rollout/kl" in r] == [1, 2, 3]
    policy = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    start = load_file(sft / "model.safetensors")
    assert all(policy[k].shape == start[k].shape for k in start)
    assert any(not torch.allclose(policy[k], start[k]) for k in start if ".h." in k)

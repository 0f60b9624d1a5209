"""PPO through accelerate's DeepSpeed integration (ZeRO-2 and ZeRO-3) in one CPU process: the engine trains policy
and critic, the reference and reward model run as inference engines, the outputs are gathered into loadable models,
and a run resumes from the engine's checkpoint."""

from __future__ import annotations

import json
import os
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
            f"data.eval_path={eval_prompts}",
            "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=8",
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


def _tensors(obj, prefix=""):
    """Every tensor inside a nested checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _engine_state(directory):
    """Weights and optimiser state (fp32 partitions, Adam's moments and step) of a DeepSpeed checkpoint."""
    files = sorted((directory / "deepspeed" / "state").glob("*.pt"))
    assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files)
    # The engine's own checkpoint, written by this test's run: trusted.
    return {f"{f.name}{k}": v for f in files
            for k, v in _tensors(torch.load(f, map_location="cpu", weights_only=False)).items()}


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_non_finite_gradient_never_reaches_the_weights_under_deepspeed_bf16(tmp_path, zero, fault):
    """DeepSpeed steps inside the backward, before the loop sees the gradient: the engine's own overflow check must
    skip the step. A NaN loss, or a finite loss with one gradient made infinite by a hook, at update 2: the
    checkpoint after it holds the weights and the optimiser moments of the one before, and the update counts as
    skipped."""
    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", sft, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 40))
    # bf16 with the engine's overflow check turned off, as a user's DeepSpeed config may have it (and DeepSpeed's
    # default was before 0.16): PPO turns it on, since its own check would come after the engine's step.
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({
        "zero_optimization": {"stage": int(zero[-1]), "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": True, "check_grad_overflow": False},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto"}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(ds_config), "--num_processes", "1", str(REPO_ROOT / "launch" / "ppo.py"), f"run_dir={tmp_path / 'run'}",
           f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}", f"data.path={prompts}",
           "data.eval_path=null", "data.eval_fraction=0.1", "eval.num_prompts=2", "eval.gold_judge=false",
           "checks.min_eos_rate=0",
           "rollout.batch_size=8", "rollout.max_new_tokens=6", "rollout.score_norm=none", "ppo.num_updates=3",
           "ppo.num_minibatches=2", "ppo.micro_batch_size=2", "optim.learning_rate=1e-2", "checkpoint.save_every=1",
           "checkpoint.keep_last=3"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RLHF_FAULT": f"{fault}:2"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run" / "ppo"
    assert read_manifest(out)["zero_stage"] == int(zero[-1])
    rows = {r["step"]: r for r in read_metrics(out) if "ppo/skipped_updates" in r}
    assert [rows[s]["ppo/skipped_updates"] for s in (1, 2, 3)] == [0, 1, 1]
    assert "update 2 skipped: non-finite gradients" in done.stderr
    before, after, later = (_engine_state(out / "checkpoints" / f"step_{s}") for s in (1, 2, 3))
    assert before.keys() == after.keys() and any("exp_avg" in k for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(after[k], later[k]) for k in after)  # training goes on after the skip

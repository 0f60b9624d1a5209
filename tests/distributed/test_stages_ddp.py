"""SFT and reward training on two CPU processes (torchrun, gloo): the global batch is split across ranks and the
gradients averaged, so two processes produce the weights one process produces on the same global batch, and not
those of a step on rank 0's half alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import RewardConfig, SFTConfig, load_config
from rlhf.launcher import REPO_ROOT
from stages import reward, sft

pytestmark = pytest.mark.distributed

STAGES = {"sft": (sft, SFTConfig, "sft.jsonl"), "reward": (reward, RewardConfig, "preferences.jsonl")}


def _overrides(root, name, model, data, batch):
    return [f"run_dir={root / name}", f"model.name_or_path={model}", f"data.path={data}", "data.eval_fraction=0",
            "data.max_length=256", "train.max_steps=1", f"train.batch_size={batch}", "train.micro_batch_size=8",
            "optim.lr_scheduler=constant", "optim.warmup_ratio=0", "optim.max_grad_norm=0",
            # Adam's first step is lr * g / (|g| + eps): with a small eps it is lr * sign(g), and float noise in
            # near-zero gradients flips signs; with eps = 1 the step is proportional to the gradient.
            "optim.learning_rate=1.0", "optim.adam_epsilon=1.0"]


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_two_processes_split_the_global_batch(tmp_path, stage):
    module, config_cls, data_name = STAGES[stage]
    model = save_tiny_causal_lm(tmp_path / "base", plain_tokenizer())
    data = write_jsonl(tmp_path / data_name, demo_rows(data_name, 64))

    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           str(REPO_ROOT / "launch" / f"{stage}.py"), *_overrides(tmp_path, "two", model, data, 16)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two" / stage
    assert read_manifest(two)["num_processes"] == 2

    one = module.run(load_config(config_cls, None, _overrides(tmp_path, "one", model, data, 16)))
    half = module.run(load_config(config_cls, None, _overrides(tmp_path, "half", model, data, 8)))
    w_two, w_one, w_half = (load_file(d / "model.safetensors") for d in (two, one, half))
    for key in w_one:
        torch.testing.assert_close(w_two[key], w_one[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(w_two[k], w_half[k], atol=1e-4) for k in w_half)

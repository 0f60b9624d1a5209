"""Two CPU processes (torchrun, gloo) train the same global batch as one process: the same weights come out."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf.checkpoint import read_manifest
from rlhf.launcher import REPO_ROOT

pytestmark = pytest.mark.distributed


def _corpus(path):
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(400):
            words = " ".join(rng.choice(["the fan", "a lamp", "is", "was", "good", "bad"]) for _ in range(6))
            handle.write(json.dumps({"text": words + " ."}) + "\n")


def _overrides(tmp_path, name):
    return [f"output_dir={tmp_path / name}", f"run_dir={tmp_path}", f"data.path={tmp_path / 'corpus.jsonl'}",
            "tokenizer.vocab_size=200", "arch.n_layer=1", "arch.n_embd=32", "arch.n_head=2", "arch.n_positions=32",
            "seq_len=32", "max_steps=4", "batch_size=8", "micro_batch_size=4", "optim.max_grad_norm=0",
            "data.eval_fraction=0.05", "logging.log_every=1"]


def test_two_processes_match_one(tmp_path):
    _corpus(tmp_path / "corpus.jsonl")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO_ROOT / "launch" / "pretrain.py"), *_overrides(tmp_path, "ddp")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ddp")
    assert manifest["num_processes"] == 2

    from rlhf.config import PretrainConfig, load_config
    from stages import pretrain

    pretrain.run(load_config(PretrainConfig, None, _overrides(tmp_path, "single")))
    assert read_manifest(tmp_path / "single")["num_processes"] == 1
    two = load_file(tmp_path / "ddp" / "model.safetensors")
    one = load_file(tmp_path / "single" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    # Training moved the weights (the comparison above is not between two untouched initialisations).
    assert manifest["metrics"]["train/loss"] < manifest["metrics"]["train/first_loss"]

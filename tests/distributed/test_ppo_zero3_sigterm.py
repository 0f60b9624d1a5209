"""PPO under DeepSpeed ZeRO-3 on two CPU processes (torchrun, gloo), stopped by SIGTERM: each process saves its
shard of the weights and optimiser state into the checkpoint, the stage exits with status 75, and the resumed run
ends with the weights of an uninterrupted one, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from support import ZERO3_ENV, demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.launcher import REPO_ROOT
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.distributed

UPDATES = 6


def _launch(tmp_path, name, *extra):
    sft, rm = tmp_path / "sft", tmp_path / "reward"
    args = [f"run_dir={tmp_path / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
            f"data.path={tmp_path / 'prompts.jsonl'}", f"data.eval_path={tmp_path / 'eval.jsonl'}",
            "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=8", "rollout.score_norm=none",
            f"ppo.num_updates={UPDATES}", "ppo.ppo_epochs=1", "ppo.num_minibatches=2", "ppo.micro_batch_size=2",
            "eval.num_prompts=4", "eval.every=1000", "eval.gold_judge=false", "checkpoint.save_every=2",
            "logging.report_to=[jsonl]", "optim.learning_rate=1e-2", *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(REPO_ROOT / "launch" / "ppo.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **ZERO3_ENV)
    # The output goes to a file: a pipe nobody reads while the run goes on would fill and stop it.
    log = tmp_path / f"{name}-{len(list(tmp_path.glob('*.log')))}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=stderr, stdout=subprocess.DEVNULL)
    return proc, log


def _finish(run, timeout=600):
    """The exit status of a launched run and its output."""
    proc, log = run
    return proc.wait(timeout=timeout), log.read_text()


def _weights(out):
    return {part: load_file(out / part / "model.safetensors") for part in ("policy", "value")}


def test_zero3_on_two_processes_survives_sigterm_and_resumes_bitwise(tmp_path):
    tokenizer = plain_tokenizer()
    save_reward_model(tmp_path / "reward", save_tiny_causal_lm(tmp_path / "sft", tokenizer), tokenizer)
    write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 80))
    write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval_prompts.jsonl", 8))

    status, stderr = _finish(_launch(tmp_path, "straight"))
    assert status == 0, stderr[-3000:]

    cut = _launch(tmp_path, "cut")
    out = tmp_path / "cut" / "ppo"
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 3 for r in read_metrics(out))):
        assert cut[0].poll() is None, cut[1].read_text()[-3000:]
        assert time.monotonic() < deadline, "update 3 not reached"
        time.sleep(0.2)
    cut[0].send_signal(signal.SIGTERM)  # to torchrun, which passes it to both processes
    status, stderr = _finish(cut, timeout=300)
    assert status != 0 and "interrupted:" in stderr and "checkpoint.resume=true" in stderr, stderr[-3000:]
    assert read_manifest(out) is None  # incomplete: nothing downstream may take it
    saved = list_checkpoints(out)
    assert saved and 3 <= saved[-1] < UPDATES, saved
    # Each process wrote its own shard of the engine's state.
    shards = sorted(p.name for p in (out / "checkpoints" / f"step_{saved[-1]}" / "deepspeed").rglob("*.pt"))
    assert sum("optim_states" in name for name in shards) == 2, shards

    status, stderr = _finish(_launch(tmp_path, "cut", "checkpoint.resume=true"))
    assert status == 0 and "resumed from" in stderr, stderr[-3000:]
    assert read_manifest(out)["status"] == "complete"
    a, b = _weights(out), _weights(tmp_path / "straight" / "ppo")
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    start = load_file(tmp_path / "sft" / "model.safetensors")
    assert any(not torch.equal(a["policy"][k], start[k]) for k in start if ".h." in k)  # the updates trained

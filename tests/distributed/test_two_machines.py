"""PPO across two machines, simulated on this one: two `accelerate launch` commands, one per machine rank, with
``--num_machines 2`` and the main process's address on the loopback, as the README's multi-machine section gives them
(one process per machine here). The result is the one-process run's within 1e-4, and only the first machine's process
writes: checkpoints, logs and the manifest once, into the shared run directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.launcher import REPO_ROOT, default_config_path
from rlhf.tracking import read_metrics
from stages import ppo

pytestmark = pytest.mark.distributed

#: Runs launch/ppo.py after wrapping what writes the run's files, so that each process lists what it wrote.
RECORDING_LAUNCHER = """
import os, runpy, sys
import rlhf.runtime, stages.ppo

def recorded(function, what):
    def wrapper(*args, **kwargs):
        with open(os.environ["WRITES_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']} {what} {args[0] if args else kwargs.get('output_dir')}\\n")
        return function(*args, **kwargs)
    return wrapper

stages.ppo.write_checkpoint = recorded(stages.ppo.write_checkpoint, "checkpoint")
rlhf.runtime.write_manifest = recorded(rlhf.runtime.write_manifest, "manifest")
sys.argv = [os.environ["PPO_LAUNCHER"], *sys.argv[1:]]
runpy.run_path(os.environ["PPO_LAUNCHER"], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_the_loopback_give_one_process_result_and_write_once(tmp_path: Path):
    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(tmp_path / "sft", tokenizer)
    rm = save_reward_model(tmp_path / "reward", sft, tokenizer)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 80))
    eval_prompts = write_jsonl(tmp_path / "eval.jsonl", demo_rows("eval_prompts.jsonl", 12))

    def overrides(name: str) -> list[str]:
        return [f"run_dir={tmp_path / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
                f"data.path={prompts}", f"data.eval_path={eval_prompts}", "checks.min_eos_rate=0",
                "rollout.batch_size=8", "rollout.max_new_tokens=8", "rollout.score_norm=first_rollout",
                "ppo.num_updates=2", "ppo.ppo_epochs=2", "ppo.num_minibatches=2", "ppo.micro_batch_size=2",
                "eval.num_prompts=8", "eval.gold_judge=false", "optim.lr_scheduler=constant", "checkpoint.save_every=1",
                "checkpoint.keep_last=2", "logging.report_to=[jsonl]",
                # As in test_ppo_ddp: with eps = 1 Adam's step is proportional to the gradient, not its sign.
                "optim.learning_rate=0.1", "optim.adam_epsilon=1.0"]

    launcher = tmp_path / "recording_launcher.py"
    launcher.write_text(RECORDING_LAUNCHER)
    writes = tmp_path / "writes.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", WRITES_LOG=str(writes),
               PPO_LAUNCHER=str(REPO_ROOT / "launch" / "ppo.py"))
    port = str(free_port())
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "--rdzv_backend", "static", str(launcher), *overrides("two")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, (rank, output[-3000:])
    two = tmp_path / "two" / "ppo"
    assert read_manifest(two)["num_processes"] == 2

    # Written once, by the first machine's process: each checkpoint, and the manifest.
    lines = writes.read_text().splitlines()
    assert sorted(lines) == sorted([f"0 checkpoint {two}"] * 2 + [f"0 manifest {two}"]), lines
    assert list_checkpoints(two) == [1, 2]
    assert "ppo: complete" in outputs[0] and "ppo: complete" not in outputs[1]

    one = ppo.run(load_config(PPOConfig, default_config_path("ppo"), overrides("one")))
    rows_one, rows_two = ([r for r in read_metrics(d) if "rollout/kl" in r] for d in (one, two))
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2]
    for row_one, row_two in zip(rows_one, rows_two):
        for key in ("rollout/score_mean", "rollout/kl", "rollout/response_len", "ppo/policy_loss", "ppo/value_loss",
                    "ppo/approx_kl"):
            assert row_two[key] == pytest.approx(row_one[key], abs=1e-4), (row_one["step"], key)
    for part in ("policy", "value"):
        a, b = (load_file(d / part / "model.safetensors") for d in (one, two))
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), part

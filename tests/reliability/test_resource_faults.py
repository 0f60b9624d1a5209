"""Resource faults: a full disk part-way through a checkpoint, an output directory that cannot be written, and
running out of memory each end with one message that names the path (or the keys to change) and what to do."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, save_tiny_sft_and_reward, write_jsonl

from rlhf.checkpoint import checkpoint_dir, list_checkpoints, read_manifest
from rlhf.config import PPOConfig, SFTConfig, load_config
from rlhf.launcher import EXIT_USER_ERROR, REPO_ROOT, default_config_path, launch
from rlhf.signals import FAULT_ENV, InjectedFault
from stages import ppo, sft

#: Larger than any log or config file the resumed run writes, smaller than its weights.
FILE_SIZE_LIMIT = 48 * 1024


def ppo_overrides(root, sft_dir, rm, prompts):
    return [f"run_dir={root / 'full'}", f"model.name_or_path={sft_dir}", f"reward_model.name_or_path={rm}",
            f"data.path={prompts}", "data.eval_path=null", "data.eval_fraction=0.1", "eval.num_prompts=2",
            "eval.every=1000", "eval.gold_judge=false",
            "checks.min_eos_rate=0", "rollout.batch_size=4", "rollout.max_new_tokens=4",
            "rollout.score_norm=none", "ppo.num_updates=4", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
            "ppo.micro_batch_size=4", "checkpoint.save_every=1", "checkpoint.keep_last=3", "logging.report_to=[jsonl]"]


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_names_the_path(tmp_path, monkeypatch):
    sft_dir, rm = save_tiny_sft_and_reward(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 32))
    overrides = ppo_overrides(tmp_path, sft_dir, rm, prompts)
    default = default_config_path("ppo")
    monkeypatch.setenv(FAULT_ENV, "after_checkpoint:2")
    with pytest.raises(InjectedFault):
        ppo.run(load_config(PPOConfig, default, overrides))
    monkeypatch.delenv(FAULT_ENV)
    out = tmp_path / "full" / "ppo"
    before = load_file(checkpoint_dir(out, 2) / "model.safetensors")
    assert (checkpoint_dir(out, 2) / "model.safetensors").stat().st_size > FILE_SIZE_LIMIT  # cannot fit under it

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "ppo.py"), *overrides, "checkpoint.resume=true"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size)

    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"cannot write {checkpoint_dir(out, 3)}" in message and "File too large" in message, message
    assert "checkpoint.resume=true" in message and "Traceback" not in proc.stderr
    assert read_manifest(out) is None
    assert list_checkpoints(out) == [1, 2]  # checkpoint 3 never became complete
    after = load_file(checkpoint_dir(out, 2) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(checkpoint_dir(out, 3).glob(".*.tmp"))  # no partial temporary file left behind

    resumed = ppo.run(load_config(PPOConfig, default, [*overrides, "checkpoint.resume=true"]))  # with room again
    assert read_manifest(resumed)["stage"] == "ppo"


def test_an_output_directory_that_cannot_be_written_is_named(tmp_path, capsys):
    tokenizer = plain_tokenizer()
    model = save_tiny_causal_lm(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "sft.jsonl", demo_rows("sft.jsonl", 16))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the run directory should be\n")
    status = launch(sft.run, SFTConfig, default_config=None, prog="launch/sft.py",
                    argv=[f"run_dir={blocker / 'run'}", f"model.name_or_path={model}", f"data.path={data}",
                          "data.max_length=256", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert status == EXIT_USER_ERROR
    assert f"cannot write {blocker / 'run'}" in err and "set run_dir to a writable directory" in err, err
    assert "Traceback" not in err
    assert blocker.read_text() == "a file where the run directory should be\n"  # nothing the user had is lost


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "21474836480 bytes")])
def test_out_of_memory_names_the_micro_batch_keys_and_other_remedies(capsys, error):
    def run_out_of_memory(cfg):
        raise error

    status = launch(run_out_of_memory, PPOConfig, default_config=None, prog="launch/ppo.py", argv=[])
    err = capsys.readouterr().err
    assert status == EXIT_USER_ERROR
    assert err.startswith("error: out of memory (") and str(error).splitlines()[0] in err
    for remedy in ("rollout.micro_batch_size", "ppo.micro_batch_size", "model.gradient_checkpointing=true",
                   "peft.method=lora", "configs/accelerate/zero3.yaml"):
        assert remedy in err
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback(capsys):
    def run_with_a_bug(cfg):
        raise RuntimeError("an internal invariant failed")

    with pytest.raises(RuntimeError, match="internal invariant"):
        launch(run_with_a_bug, PPOConfig, default_config=None, prog="launch/ppo.py", argv=[])

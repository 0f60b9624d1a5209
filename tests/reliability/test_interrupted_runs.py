"""Interrupted runs under the real launchers.

SIGTERM sent to ``accelerate launch`` or ``torchrun`` makes the stage save a checkpoint and exit with status 75;
a SIGKILL at an exact point of checkpointing (``RLHF_FAULT=<point>:<step>:kill``) leaves the previous complete
checkpoint and a stage marked incomplete, and a resumed run then ends where an uninterrupted one does: SFT and the
reward model at the same step with losses within 1e-5, PPO bitwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import checkpoints_dir, list_checkpoints, read_manifest
from rlhf.config import PPOConfig, PretrainConfig, RewardConfig, SFTConfig, load_config
from rlhf.launcher import REPO_ROOT, default_config_path
from rlhf.pipeline import _children, reap_adopted
from rlhf.signals import EXIT_INTERRUPTED, FAULT_ENV, adopt_orphans
from rlhf.tracking import read_metrics
from rlhf.trl_bridge import last_trainer_checkpoint
from stages import ppo, pretrain, reward, sft

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone"]
LAUNCHERS = {"accelerate": ACCELERATE, "torchrun": TORCHRUN}
STAGES = {"pretrain": (pretrain, PretrainConfig), "sft": (sft, SFTConfig), "reward": (reward, RewardConfig),
          "ppo": (ppo, PPOConfig)}
#: Stages whose checkpoints are ours (checkpoints/step_N); the others' are the Trainer's (checkpoint-N).
OWN_CHECKPOINTS = ("pretrain", "ppo")
#: PPO with a critic-free estimator, run as "ppo-grpo": launch/ppo.py with these overrides, and no critic to save.
VARIANTS = {"ppo-grpo": ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4"]}


def stage_of(name: str) -> str:
    """The stage a test case runs ("ppo" for "ppo-grpo")."""
    return name.split("-")[0]

pytestmark = pytest.mark.slow  # 12 launches of real launchers and the runs to compare with: about 8 minutes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    tokenizer = plain_tokenizer()
    base = save_tiny_causal_lm(root / "base", tokenizer)
    return {
        "root": root,
        "base": base,
        "rm": save_reward_model(root / "rm", base, tokenizer),
        "sft.jsonl": write_jsonl(root / "sft.jsonl", demo_rows("sft.jsonl", 64)),
        "preferences.jsonl": write_jsonl(root / "preferences.jsonl", demo_rows("preferences.jsonl", 64)),
        "prompts.jsonl": write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 64)),
        "eval.jsonl": write_jsonl(root / "eval.jsonl", demo_rows("eval_prompts.jsonl", 8)),
        "corpus.jsonl": write_jsonl(root / "corpus.jsonl", demo_rows("corpus.jsonl", 400)),
    }


def overrides(inputs, stage, name, steps):
    common = [f"run_dir={inputs['root'] / name}", "logging.log_every=1"]
    if stage == "pretrain":
        return common + [  # output_dir too: the demo config writes the bundled base model
            f"output_dir={inputs['root'] / name / 'pretrain'}", f"data.path={inputs['corpus.jsonl']}",
            "tokenizer.vocab_size=300",
            "arch.n_layer=2", "arch.n_embd=32", "arch.n_head=2", "seq_len=64", f"max_steps={steps}",
            "batch_size=8", "micro_batch_size=8", "eval_every=1000", "checkpoint.save_every=2",
            "checkpoint.keep_last=2"]
    if stage_of(stage) == "ppo":
        return common + VARIANTS.get(stage, []) + [
            f"model.name_or_path={inputs['base']}", f"reward_model.name_or_path={inputs['rm']}",
            f"data.path={inputs['prompts.jsonl']}", f"data.eval_path={inputs['eval.jsonl']}",
            "checks.min_eos_rate=0", "rollout.batch_size=8",
            "rollout.max_new_tokens=8", "rollout.score_norm=none", f"ppo.num_updates={steps}", "ppo.ppo_epochs=1",
            "ppo.num_minibatches=1", "ppo.micro_batch_size=8", "eval.num_prompts=4", "eval.every=1000",
            "eval.gold_judge=false", "checkpoint.save_every=2", "checkpoint.keep_last=2"]
    data = inputs["sft.jsonl" if stage == "sft" else "preferences.jsonl"]
    return common + [
        f"model.name_or_path={inputs['base']}", f"data.path={data}", "data.eval_fraction=0", "data.max_length=256",
        f"train.max_steps={steps}", "train.batch_size=8", "train.micro_batch_size=8", "optim.learning_rate=1e-3",
        "checkpoint.save_every=2", "checkpoint.keep_last=2"]


def named_run(inputs, stage, name, steps):
    """The overrides of a run called ``name`` and its stage output directory."""
    return overrides(inputs, stage, name, steps), inputs["root"] / name / stage_of(stage)


def resume_and_compare(stage, args, straight_out):
    resumed = run_in_process(stage, [*args, "checkpoint.resume=true"])
    assert read_manifest(resumed) is not None
    assert_same_end(stage, resumed, straight_out)


def launch(launcher, stage, args, env=None):
    command = [*LAUNCHERS[launcher], str(REPO_ROOT / "launch" / f"{stage_of(stage)}.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)


def run_in_process(stage, args):
    stage = stage_of(stage)
    module, config_cls = STAGES[stage]
    # What the launchers start from: PPO and pretrain read their demo config unless given another.
    default = default_config_path(stage) if stage in OWN_CHECKPOINTS else None
    return module.run(load_config(config_cls, default, args))


def wait_for_step(metrics: Path, step: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def saved_steps(stage, out):
    if stage_of(stage) in OWN_CHECKPOINTS:
        return list_checkpoints(out)
    newest = last_trainer_checkpoint(out)
    return [int(Path(newest).name.split("-")[1])] if newest else []


def final_losses(stage, out):
    if stage_of(stage) in OWN_CHECKPOINTS:
        parts = {"ppo": ("policy", "value"), "ppo-grpo": ("policy",)}.get(stage, (".",))
        return {part: load_file(out / part / "model.safetensors") for part in parts}
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    return {"step": rows[-1]["step"], "loss": rows[-1]["train/loss"]}


def assert_same_end(stage, resumed, straight):
    a, b = final_losses(stage, resumed), final_losses(stage, straight)
    if stage_of(stage) in OWN_CHECKPOINTS:  # bitwise
        for part in a:
            assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    else:
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def straight(inputs):
    """Uninterrupted runs to compare with, one per stage, built on first use."""
    cache = {}

    def get(stage, steps):
        if (stage, steps) not in cache:
            cache[stage, steps] = run_in_process(stage, overrides(inputs, stage, f"straight-{stage}-{steps}", steps))
        return cache[stage, steps]

    return get


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_sigterm_to_the_launcher_saves_a_checkpoint_and_the_stage_exits_75(inputs, straight, stage, launcher):
    steps = 40
    args, out = named_run(inputs, stage, f"term-{launcher}-{stage}", steps)
    assert adopt_orphans()  # so that this test can read the exit status of a stage whose launcher exited first
    earlier = _children()
    proc = launch(launcher, stage, args)
    wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as `kill <pid>` or a scheduler's first signal does
    stderr = proc.communicate(timeout=300)[1]  # the pipe closes when the stage process has exited too
    assert "interrupted:" in stderr and "checkpoint.resume=true" in stderr, stderr[-3000:]
    assert not any(f'File "{REPO_ROOT / part}' in stderr for part in ("rlhf", "stages", "launch")), stderr[-3000:]
    if launcher == "accelerate" and proc.returncode == -signal.SIGTERM:
        # accelerate before 1.16 exits on SIGTERM at once; the stage, adopted here, stops on its own.
        assert reap_adopted(earlier) == [EXIT_INTERRUPTED]
    elif launcher == "accelerate":
        # accelerate 1.16 passes SIGTERM on, waits for the stage (5 s at most) and exits with 128 + SIGTERM.
        assert proc.returncode == 128 + signal.SIGTERM and reap_adopted(earlier) == []
    else:  # torchrun passes SIGTERM on, waits for its worker and then reports the signal itself
        assert proc.returncode != 0
    assert read_manifest(out) is None  # incomplete: nothing downstream may take it
    assert 3 <= saved_steps(stage, out)[-1] < steps
    resume_and_compare(stage, args, straight(stage, steps))


@pytest.mark.parametrize("point", ["checkpoint_write", "after_checkpoint"])
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "ppo-grpo"])
def test_sigkill_at_a_checkpoint_keeps_the_previous_one_and_resume_matches(inputs, straight, stage, point):
    steps = 8
    args, out = named_run(inputs, stage, f"kill-{point}-{stage}", steps)
    proc = launch("accelerate", stage, args, env={FAULT_ENV: f"{point}:4:kill"})
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, stderr[-3000:]
    assert read_manifest(out) is None
    # Killed part-way through writing checkpoint 4, checkpoint 2 is the newest complete one.
    assert saved_steps(stage, out)[-1] == (4 if point == "after_checkpoint" else 2)
    if point == "checkpoint_write":
        assert any(p.name.endswith("4") for p in checkpoints_dir(out).iterdir())  # the cut-short one is there
    resume_and_compare(stage, args, straight(stage, steps))


def test_sigterm_to_rlhf_run_stops_the_stage_and_reports_its_75(inputs):
    """`rlhf run` passes SIGTERM to the stage's `accelerate launch`; the stage saves its checkpoint, and the pipeline
    waits for it and exits with the stage's status (whether the launcher exits at once, before accelerate 1.16, or
    waits for the stage and reports the signal, from 1.16)."""
    import json

    root = inputs["root"] / "pipeline"
    root.mkdir()
    args = [a for a in overrides(inputs, "sft", "unused", 40) if not a.startswith("run_dir=")]
    spec = root / "pipeline.yaml"
    spec.write_text("\n".join([
        "name: cut", f"run_dir: {root / 'run'}", "stages:", "  sft:",
        f"    config: {REPO_ROOT / 'configs' / 'sft' / 'demo.yaml'}",
        f"    accelerate_config: {REPO_ROOT / 'configs' / 'accelerate' / 'cpu.yaml'}",
        f"    overrides: {json.dumps(args)}"]) + "\n")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "pipeline.py"), "--config", str(spec)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=root, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    out = root / "run" / "sft"
    wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "interrupted:" in stderr and "--resume" in stderr, stderr[-3000:]
    assert read_manifest(out) is None and last_trainer_checkpoint(out) is not None

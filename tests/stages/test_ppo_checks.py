"""The checks between stages on real stage outputs: PPO refuses a reward model that failed its stage's gate before
loading weights, and stops before its first update when the reward model's scores do not spread or the SFT policy
does not stop; each key proceeds anyway."""

from __future__ import annotations

import functools

import pytest
import torch
from support import demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import RewardConfig, load_config
from rlhf.launcher import EXIT_USER_ERROR, launch
from rlhf.pipeline import run_with_upstream
from rlhf.tracking import read_metrics
from stages import ppo, reward


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(root / "sft", tokenizer)
    rm = save_reward_model(root / "rm", sft, tokenizer)
    constant = save_reward_model(root / "constant-rm", sft, tokenizer)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(constant)
    with torch.no_grad():
        model.score.weight.zero_()  # every sequence scores 0
    model.save_pretrained(constant)
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 24))
    eval_prompts = write_jsonl(root / "eval.jsonl", demo_rows("eval_prompts.jsonl", 8))
    prefs = write_jsonl(root / "prefs.jsonl", demo_rows("preferences.jsonl", 64))
    return {"root": root, "sft": sft, "rm": rm, "constant": constant, "prompts": prompts, "eval": eval_prompts,
            "prefs": prefs}


def run_ppo(files, name, capsys, *extra):
    argv = [f"run_dir={files['root'] / name}", f"model.name_or_path={files['sft']}", f"data.path={files['prompts']}",
            f"data.eval_path={files['eval']}", "rollout.batch_size=8", "rollout.max_new_tokens=8",
            "rollout.score_norm=none", "ppo.num_updates=1", "ppo.micro_batch_size=4", "eval.num_prompts=8",
            "eval.gold_judge=false", "upstream_configs={}", *extra]
    status = launch(functools.partial(run_with_upstream, run_ppo=ppo.run), ppo.Config, default_config=None,
                    prog="launch/ppo.py", argv=argv)
    return status, capsys.readouterr().err, files["root"] / name / "ppo"


def gated_reward(files, name, minimum):
    return reward.run(load_config(RewardConfig, None, [
        f"run_dir={files['root'] / name}", f"model.name_or_path={files['sft']}", f"data.path={files['prefs']}",
        "data.eval_fraction=0.25", "data.max_length=256", "train.max_steps=2", "train.batch_size=8",
        "train.micro_batch_size=8", f"min_eval_accuracy={minimum}"]))


def test_ppo_refuses_a_reward_model_that_failed_its_gate(files, capsys):
    failed = gated_reward(files, "gate-failed", 0.99)
    gate = read_manifest(failed)["gate"]
    assert gate["passed"] is False and gate["min_eval_accuracy"] == 0.99
    status, stderr, out = run_ppo(files, "refused", capsys, f"reward_model.name_or_path={failed}",
                                  "checks.min_eos_rate=0")
    assert status == EXIT_USER_ERROR and "Traceback" not in stderr
    assert "failed its gate" in stderr and "reward.min_eval_accuracy=0.99" in stderr
    assert "checks.reward_gate=false" in stderr
    assert not out.exists()  # refused before any weights loaded
    status, _, out = run_ppo(files, "waived", capsys, f"reward_model.name_or_path={failed}", "checks.min_eos_rate=0",
                             "checks.reward_gate=false")
    assert status == 0 and read_manifest(out) is not None


def test_ppo_uses_a_reward_model_that_passed_its_gate(files, capsys):
    passed = gated_reward(files, "gate-passed", 0.0)
    assert read_manifest(passed)["gate"]["passed"] is True
    status, _, out = run_ppo(files, "passed", capsys, f"reward_model.name_or_path={passed}", "checks.min_eos_rate=0")
    assert status == 0 and read_manifest(out)["checks"]["score_std"] > 0.01


def test_ppo_stops_before_its_first_update_on_scores_that_do_not_spread(files, capsys):
    status, stderr, out = run_ppo(files, "constant", capsys, f"reward_model.name_or_path={files['constant']}",
                                  "checks.min_eos_rate=0", "checkpoint.save_every=1")
    assert status == EXIT_USER_ERROR and "Traceback" not in stderr
    assert "barely spread (standard deviation 0" in stderr and "checks.min_score_std=0" in stderr
    assert read_manifest(out) is None and list_checkpoints(out) == []
    assert {row["step"] for row in read_metrics(out) if "step" in row} == {0}  # the initial evaluation only
    status, _, out = run_ppo(files, "constant-waived", capsys, f"reward_model.name_or_path={files['constant']}",
                             "checks.min_eos_rate=0", "checks.min_score_std=0")
    assert status == 0


def test_ppo_stops_before_its_first_update_when_the_policy_does_not_stop(files, capsys):
    """The tiny untrained policy stops in few of its samples: the default floor trips; below its rate it passes."""
    status, stderr, out = run_ppo(files, "no-stop", capsys, f"reward_model.name_or_path={files['rm']}")
    assert status == EXIT_USER_ERROR and "Traceback" not in stderr
    assert "initial held-out samples stop (EOS)" in stderr and "checks.min_eos_rate=0" in stderr
    assert read_manifest(out) is None and list_checkpoints(out) == []
    rate = [r for r in read_metrics(out) if "eval/eos_rate" in r][0]["eval/eos_rate"]
    assert 0 < rate < 0.5
    status, _, out = run_ppo(files, "stops-enough", capsys, f"reward_model.name_or_path={files['rm']}",
                             f"checks.min_eos_rate={rate / 2}")
    assert status == 0 and read_manifest(out)["checks"]["eos_rate"] == pytest.approx(rate)

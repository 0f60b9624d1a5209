"""The dashboards are on by default: a PPO run with no logging key writes an offline W&B run and TensorBoard logs
holding what metrics.jsonl holds (reward curves, held-out evaluations, sample tables, alarms, the config), records
where they are in its manifest, and ends by printing the command that uploads the W&B run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from support import demo_rows, save_tiny_sft_and_reward, wandb_run_contents, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import PPOConfig
from rlhf.launcher import launch
from rlhf.tracking import read_metrics, read_samples
from stages import ppo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A three-update PPO run through its launcher with the logging defaults; the score-length alarm fires at
    update 1 (threshold -1), so the run has an alarm to show."""
    root = tmp_path_factory.mktemp("dashboards")
    sft, rm = save_tiny_sft_and_reward(root)
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 16))
    eval_prompts = write_jsonl(root / "eval.jsonl", demo_rows("eval_prompts.jsonl", 4))
    argv = [f"run_dir={root / 'exp-7'}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
            f"data.path={prompts}", f"data.eval_path={eval_prompts}", "checks.min_eos_rate=0", "rollout.batch_size=8",
            "rollout.max_new_tokens=6", "rollout.score_norm=none", "ppo.num_updates=3", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
            "ppo.micro_batch_size=8", "eval.num_prompts=4", "eval.gold_judge=false", "samples_every=2",
            "alarms.window=1", "alarms.max_length_correlation=-1"]
    return root / "exp-7", argv


def test_a_ppo_run_logs_to_wandb_and_tensorboard_without_being_asked(run, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, argv = run
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no credentials and no mode: W&B offline, as for a new user
    monkeypatch.setenv("NETRC", str(run_dir.parent / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert PPOConfig().logging.report_to == ["jsonl", "wandb", "tensorboard"]
    assert launch(ppo.run, PPOConfig, default_config=None, prog="launch/ppo.py", argv=argv) == 0
    out = run_dir / "ppo"
    trackers = read_manifest(out)["trackers"]
    assert trackers["wandb"]["mode"] == "offline" and trackers["wandb"]["group"] == "exp-7"
    wandb_dir = Path(trackers["wandb"]["dir"])
    assert wandb_dir.parent == run_dir / "wandb" and trackers["tensorboard"]["dir"] == str(out / "tensorboard")
    # The last lines of the command: how to upload the run, how to look at the TensorBoard logs.
    printed = capsys.readouterr().out.splitlines()
    sync = next(line for line in printed if line.strip().startswith("wandb sync "))
    assert [Path(p).resolve() for p in shlex.split(sync)[2:]] == [wandb_dir.resolve()]
    assert any(line.startswith("TensorBoard: tensorboard --logdir ") for line in printed)

    metrics = read_metrics(out)
    contents = wandb_run_contents(wandb_dir)
    assert (contents["run"].run_group, contents["run"].job_type, contents["run"].display_name) == (
        "exp-7", "ppo", "exp-7-ppo")
    history: dict[int, dict] = {}
    for row in contents["history"]:
        history.setdefault(row["_step"], {}).update(row)
    # Every number metrics.jsonl holds is on W&B at the same step: reward curves, evaluations, alarms.
    for record in metrics:
        logged = {key: value for key, value in record.items() if key not in ("step", "time")}
        assert {key: history[record["step"]].get(key) for key in logged} == logged, record["step"]
    keys = set().union(*(record.keys() for record in metrics))
    assert {"rollout/score_mean", "rollout/reward_mean", "eval/score_mean", "ppo/kl_coef",
            "alarm/fired/length_correlation"} <= keys
    assert [s for s, row in sorted(history.items()) if "eval/score_mean" in row] == [0, 3]
    # The sample tables, as W&B table files with the rows of samples.jsonl.
    for table, step in (("rollout_samples", 2), ("rollout_samples", 3), ("eval_samples", 3)):
        assert history[step][f"{table}/_type"] == "table-file", (table, step)
        (path,) = wandb_dir.glob(f"files/media/table/{table}_{step}_*.table.json")
        rows = [r for r in read_samples(out) if r["table"] == table and r["step"] == step]
        assert len(json.loads(path.read_text())["data"]) == len(rows) > 0
    assert contents["config"]["ppo"]["kl_coef"] == PPOConfig().ppo.kl_coef
    assert contents["config"]["alarms"]["max_length_correlation"] == -1
    assert contents["summary"]["final/score_mean"] == read_manifest(out)["metrics"]["final/score_mean"]

    events = EventAccumulator(trackers["tensorboard"]["dir"])
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("rollout/reward_mean")]
    expected = [(r["step"], r["rollout/reward_mean"]) for r in metrics if "rollout/reward_mean" in r]
    assert [s for s, _ in curve] == [s for s, _ in expected] == [1, 2, 3]
    assert [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 in TensorBoard
    assert {"config/text_summary", "rollout_samples/text_summary", "eval_samples/text_summary"} <= set(events.Tags()["tensors"])


def test_a_rerun_starts_its_tensorboard_logs_afresh(run, monkeypatch):
    """A fresh run replaces the logs of the run it replaces (as it does metrics.jsonl); the W&B runs stay apart."""
    run_dir, argv = run
    monkeypatch.setenv("WANDB_MODE", "disabled")
    before = sorted((run_dir / "ppo" / "tensorboard").glob("events.*"))
    assert before
    assert launch(ppo.run, PPOConfig, default_config=None, prog="launch/ppo.py", argv=[*argv, "ppo.num_updates=1"]) == 0
    after = sorted((run_dir / "ppo" / "tensorboard").glob("events.*"))
    assert len(after) == 1 and after[0] not in before
    assert read_manifest(run_dir / "ppo")["trackers"]["wandb"]["mode"] == "disabled"


def test_a_stage_starts_its_own_wandb_service(run, tmp_path):
    """A W&B service a parent process left in the environment (WANDB_SERVICE; gone with that process here) is not
    the stage's: it starts its own and its offline run is complete."""
    import os
    import subprocess
    import sys

    from support import wandb_run_contents

    from rlhf.launcher import REPO_ROOT

    _, argv = run
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SERVICE="3-999999-tcp-localhost-9")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "ppo.py"), *argv, f"run_dir={tmp_path / 'own'}",
                           "ppo.num_updates=1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    directory = read_manifest(tmp_path / "own" / "ppo")["trackers"]["wandb"]["dir"]
    assert wandb_run_contents(Path(directory))["run"].job_type == "ppo"

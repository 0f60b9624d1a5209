"""The reward-hacking alarms in the PPO loop: what happens when one fires (a warning, a metric, a W&B alert, the
manifest) and the optional stop with a checkpoint, resumed to the weights of a run that never stopped."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from support import tiny_ppo_inputs

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.errors import AlarmStop
from rlhf.tracking import read_metrics
from stages import ppo


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_ppo_inputs(tmp_path_factory.mktemp("alarms"), prompts=24, eval_prompts=4)


def config(files, name, *extra) -> PPOConfig:
    root, sft, rm, prompts, eval_prompts = files
    # Only the score-length correlation alarm is on (the tiny untrained policy's signals mean nothing), with a window
    # of one update and a threshold of -1, which any correlation but exactly -1 exceeds: it fires at update 1.
    return load_config(PPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", f"data.eval_path={eval_prompts}", "checks.min_eos_rate=0", "rollout.batch_size=8",
        "rollout.max_new_tokens=6", "rollout.score_norm=none", "ppo.num_updates=3", "ppo.ppo_epochs=1",
        "ppo.num_minibatches=1", "ppo.micro_batch_size=8", "eval.num_prompts=4", "eval.gold_judge=false",
        "optim.learning_rate=1e-2", "optim.lr_scheduler=constant", "alarms.window=1", "alarms.max_kl=null",
        "alarms.max_length_correlation=-1", "alarms.max_repetition=null", "alarms.min_eos_rate=null",
        "alarms.min_entropy_ratio=null", *extra])


def test_an_alarm_warns_logs_a_marker_alerts_wandb_and_is_in_the_manifest(files, monkeypatch, caplog):
    from wandb.sdk.wandb_run import Run

    alerts = []
    monkeypatch.setattr(Run, "alert", lambda self, title, text, level=None, **kw: alerts.append((title, text, level)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.WARNING, logger="stages.ppo"):
        out = ppo.run(config(files, "fires", "logging.report_to=[jsonl, wandb]"))
    assert read_manifest(out)["alarms"] == {"length_correlation": 1}
    assert [r["step"] for r in read_metrics(out) if "alarm/fired/length_correlation" in r] == [1]
    assert "reward-hacking alarm 'length_correlation' after update 1: score-length correlation" in caplog.text
    assert [(title, str(level)) for title, _, level in alerts] == [("rlhf alarm: length_correlation",
                                                                    "AlertLevel.WARN")]
    assert "alarms.max_length_correlation=-1" in alerts[0][1]


@pytest.mark.slow  # three runs; the default suite has the alarm itself and the resume of PPO's other stops
def test_alarms_stop_saves_a_checkpoint_and_a_resume_ends_where_a_run_that_went_on_ends(files):
    with pytest.raises(AlarmStop, match=r"after update 1 by the reward-hacking alarms \['length_correlation'\]"):
        ppo.run(config(files, "stops", "alarms.stop=true"))
    out = files[0] / "stops" / "ppo"
    assert read_manifest(out) is None and list_checkpoints(out)[-1] == 1
    resumed = ppo.run(config(files, "stops", "checkpoint.resume=true"))
    straight = ppo.run(config(files, "straight"))
    assert read_manifest(resumed)["alarms"] == read_manifest(straight)["alarms"] == {"length_correlation": 1}
    a, b = (load_file(d / "policy" / "model.safetensors") for d in (resumed, straight))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_no_alarm_fires_without_a_reason(files):
    out = ppo.run(config(files, "quiet", "alarms.max_length_correlation=null"))
    assert read_manifest(out)["alarms"] == {}
    assert not any(k.startswith("alarm/fired/") for r in read_metrics(out) for k in r)

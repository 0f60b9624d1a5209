"""The critic-free estimators (GRPO, RLOO, REINFORCE++) on the PPO stage: groups of responses per prompt, no critic,
the KL as a loss term, the loss aggregations, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, save_tiny_sft_and_reward, write_jsonl

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.errors import ConfigError
from rlhf.signals import FAULT_ENV, InjectedFault
from rlhf.tracking import read_metrics
from stages import ppo


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic_free")
    sft, rm = save_tiny_sft_and_reward(root)
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 40))
    eval_prompts = write_jsonl(root / "eval.jsonl", [r for r in demo_rows("eval_prompts.jsonl", 60)][-6:])
    return root, sft, rm, prompts, eval_prompts


def config(files, name: str, *extra: str) -> PPOConfig:
    root, sft, rm, prompts, eval_prompts = files
    return load_config(PPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", f"data.eval_path={eval_prompts}",
        "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=8",
        "rollout.samples_per_prompt=4", "rollout.score_norm=first_rollout", "ppo.num_updates=2", "ppo.ppo_epochs=1",
        "ppo.num_minibatches=2", "ppo.micro_batch_size=2", "eval.num_prompts=4", "eval.gold_judge=false",
        "optim.learning_rate=1e-2", "optim.lr_scheduler=constant", *extra,
    ])


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_a_critic_free_run_builds_trains_and_saves_no_critic(files, estimator):
    seen = {}

    def hook(update, models):
        assert models.trained.critic is None
        seen[update] = {k: v.detach().clone() for k, v in models.trained.policy.state_dict().items()}

    out = ppo.run(config(files, estimator, f"ppo.advantage_estimator={estimator}"), on_update=hook)
    assert (out / "policy").is_dir() and not (out / "value").exists()
    manifest = read_manifest(out)
    assert manifest["critic_init"] == "none"
    assert any(not torch.equal(seen[0][k], seen[2][k]) for k in seen[0])
    rows = [r for r in read_metrics(out) if "ppo/policy_loss" in r]
    assert len(rows) == 2
    assert not any(key in row for row in rows for key in ppo.CRITIC_METRICS)
    assert all(row["ppo/optimizer_steps"] == 2 for row in rows)
    checkpoint_keys = load_file(out / "policy" / "model.safetensors").keys()
    assert checkpoint_keys and not any("score" in key for key in checkpoint_keys)


def test_the_responses_of_a_group_answer_one_prompt(files, monkeypatch):
    seen = []
    original = ppo.generate_rollout

    def generate_rollout(cfg, scoring, prompt_ids, indices):
        seen.append((list(indices), [tuple(p) for p in prompt_ids]))
        return original(cfg, scoring, prompt_ids, indices)

    monkeypatch.setattr(ppo, "generate_rollout", generate_rollout)
    ppo.run(config(files, "groups", "ppo.advantage_estimator=grpo"))
    (indices0, prompts0), (indices1, prompts1) = seen
    assert indices0 == list(range(8)) and indices1 == list(range(8, 16))
    for prompts in (prompts0, prompts1):
        assert prompts[0] == prompts[3] and prompts[4] == prompts[7] and prompts[0] != prompts[4]
    assert prompts0[0] != prompts1[0]  # the next update takes the next prompts


def test_grpo_advantages_are_the_group_normalised_outcomes(files, monkeypatch):
    from rlhf.ppo.estimators import grpo_advantages

    seen = {}
    original = ppo.rewards_and_advantages

    def rewards_and_advantages(cfg, accelerator, rollout, scored, *args, **kwargs):
        shaped = original(cfg, accelerator, rollout, scored, *args, **kwargs)
        seen.setdefault("shaped", shaped)
        seen.setdefault("mask", rollout.response_mask)
        return shaped

    monkeypatch.setattr(ppo, "rewards_and_advantages", rewards_and_advantages)
    ppo.run(config(files, "grpo-values", "ppo.advantage_estimator=grpo", "ppo.num_updates=1"))
    shaped, mask = seen["shaped"], seen["mask"]
    outcome = (shaped.rewards * mask).sum(-1)
    expected = grpo_advantages(outcome, 4)
    for row in range(8):
        valid = shaped.advantages[row][mask[row]]
        torch.testing.assert_close(valid, expected[row].expand_as(valid))
    assert not shaped.advantages[~mask].any()


def test_the_kl_as_a_loss_term_is_logged_and_leaves_the_rewards(files, monkeypatch):
    seen = {}
    original = ppo.shaped_rewards

    def shaped_rewards(scores, kl, mask, kl_coef):
        seen.setdefault("kl_coef", kl_coef)
        return original(scores, kl, mask, kl_coef)

    monkeypatch.setattr(ppo, "shaped_rewards", shaped_rewards)
    out = ppo.run(config(files, "kl-loss", "ppo.advantage_estimator=grpo", "ppo.kl_penalty=loss", "ppo.kl_coef=0.5",
                         "ppo.loss_aggregation=seq_mean_token_mean"))
    assert seen["kl_coef"] == 0.0
    rows = [r for r in read_metrics(out) if "ppo/kl_loss" in r]
    # k3 >= 0; 0 only while the policy is its reference (the first minibatch), then above it.
    assert len(rows) == 2 and all(r["ppo/kl_loss"] > 1e-9 for r in rows)


def test_gae_keeps_the_critic_and_its_metrics(files):
    out = ppo.run(config(files, "gae", "ppo.num_updates=1", "rollout.samples_per_prompt=1"))
    assert (out / "value").is_dir()
    row = [r for r in read_metrics(out) if "ppo/policy_loss" in r][0]
    assert all(key in row for key in ppo.CRITIC_METRICS)


@pytest.mark.parametrize("overrides, message", [
    (["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt to 2 or more"),
    (["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=1"], "rollout.samples_per_prompt to 2 or more"),
    (["rollout.samples_per_prompt=3"], "rollout.batch_size=8 is not a multiple of rollout.samples_per_prompt=3"),
])
def test_group_config_errors_name_the_keys(files, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(files, "bad", *overrides).validate()


def test_a_group_never_straddles_processes(files):
    cfg = config(files, "layout", "rollout.batch_size=8", "rollout.samples_per_prompt=8")
    with pytest.raises(ConfigError, match="samples_per_prompt=8 does not divide"):
        cfg.batch_layout(2)
    assert cfg.batch_layout(1).rollouts == 8


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_resume_after_a_fault_matches_an_uninterrupted_run_bitwise(files, monkeypatch, estimator):
    extra = [f"ppo.advantage_estimator={estimator}", "ppo.num_updates=3", "checkpoint.save_every=1"]
    straight = ppo.run(config(files, f"straight-{estimator}", *extra))
    monkeypatch.setenv(FAULT_ENV, "after_checkpoint:2")
    with pytest.raises(InjectedFault):
        ppo.run(config(files, f"resumed-{estimator}", *extra))
    monkeypatch.delenv(FAULT_ENV)
    resumed = ppo.run(config(files, f"resumed-{estimator}", *extra, "checkpoint.resume=true"))
    a, b = load_file(straight / "policy" / "model.safetensors"), load_file(resumed / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))  # noqa: E731
                          and k != "time"} for r in rows]
    assert drop(read_metrics(straight)) == drop(read_metrics(resumed))
    assert list_checkpoints(resumed)[-1] == 3


def test_grpo_trains_on_rule_based_rewards_alone(files, monkeypatch):
    from rlhf.scoring import RewardScorer

    calls = []
    original = RewardScorer.score

    def score(self, prompts, prompt_ids, response_ids):
        calls.append(len(prompts))
        return original(self, prompts, prompt_ids, response_ids)

    monkeypatch.setattr(RewardScorer, "score", score)
    functions = '{"rlhf.demo.rules:positive_words": 1.0, "rlhf.demo.rules:complete_sentences": 0.5}'
    out = ppo.run(config(files, "rules", "ppo.advantage_estimator=grpo", "rewards.reward_model_weight=0",
                         f"rewards.functions={functions}"))
    # The reward model scored the held-out evaluation (before and after) only, never a rollout.
    assert sum(calls) == 2 * 4
    rows = [r for r in read_metrics(out) if "rollout/reward_mean" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["rollout/score_mean"] == 0.0
        penalty = 1.0 - row["rollout/eos_rate"]
        expected = row["reward/positive_words"] + 0.5 * row["reward/complete_sentences"] - penalty
        assert row["rollout/reward_mean"] == pytest.approx(expected, abs=1e-5)
    assert not (out / "value").exists()


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_a_run_on_reward_functions_alone_loads_no_reward_model(files, monkeypatch, estimator):
    """No reward output in the run directory and none given: with its weight 0 and eval.reward_model=false the run
    needs none. The held-out evaluation reports the functions' scores; with gae the critic starts from the policy."""
    from rlhf import pipeline
    from rlhf.scoring import RewardScorer

    built = []
    monkeypatch.setattr(RewardScorer, "__init__", lambda self, *a, **k: built.append(a))
    functions = '{"rlhf.demo.rules:positive_words": 1.0}'
    group = "rollout.samples_per_prompt=1" if estimator == "gae" else "rollout.samples_per_prompt=4"
    cfg = config(files, f"no-rm-{estimator}", f"ppo.advantage_estimator={estimator}", group,
                 "reward_model.name_or_path=", "rewards.reward_model_weight=0", "eval.reward_model=false",
                 f"rewards.functions={functions}")
    assert not (Path(cfg.run_dir) / "reward").exists()
    assert pipeline.build_missing_upstream(cfg) == []  # the SFT output is given; no reward stage is built
    out = ppo.run(cfg)
    assert built == []
    manifest = read_manifest(out)
    assert "reward_model" not in manifest["inputs"] and "model" in manifest["inputs"]
    assert manifest["critic_init"] == ("policy" if estimator == "gae" else "none")
    evals = [r for r in read_metrics(out) if "eval/kl" in r]
    assert len(evals) == 2
    for row in evals:
        assert "eval/score_mean" not in row and 0.0 <= row["eval/reward/positive_words"] <= 1.0
    assert "final/reward/positive_words" in manifest["metrics"]
    assert "final/score_mean" not in manifest["metrics"]


def test_without_a_reward_model_the_critic_cannot_start_from_one(files):
    with pytest.raises(ConfigError, match="ppo.critic_init=policy"):
        config(files, "x", "rewards.reward_model_weight=0", "eval.reward_model=false", "ppo.critic_init=reward",
               'rewards.functions={"rlhf.demo.rules:positive_words": 1.0}').validate()


@pytest.mark.parametrize("estimator", ["gae", "grpo", "reinforce_pp"])
def test_a_non_finite_score_skips_one_update(files, monkeypatch, estimator):
    """With ``rollout.score_norm=first_rollout`` too: the NaN of the first rollout must not become the scores'
    normalisation, which would skip every later update."""
    seen = {}
    monkeypatch.setenv(FAULT_ENV, "nan_scores:1")
    group = "rollout.samples_per_prompt=1" if estimator == "gae" else "rollout.samples_per_prompt=4"
    out = ppo.run(config(files, f"nan-{estimator}", f"ppo.advantage_estimator={estimator}", group),
                  on_update=lambda i, m: seen.__setitem__(i, {k: v.detach().clone()
                                                              for k, v in m.trained.policy.state_dict().items()}))
    rows = [r for r in read_metrics(out) if "ppo/skipped_updates" in r]
    assert [r["ppo/skipped_updates"] for r in rows] == [1, 1]
    assert rows[0]["ppo/optimizer_steps"] == 0 and rows[1]["ppo/optimizer_steps"] == 2
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # the skipped update left the weights

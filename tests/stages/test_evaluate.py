"""The evaluation stage on tiny models: both policies on the same prompts and random streams, pairwise win rates,
KL to the SFT policy, eval.json and the sample table."""

from __future__ import annotations

import json

import pytest
from support import demo_rows, save_tiny_sft_and_reward, spy_on_packed_products, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import EvaluateConfig, PPOConfig, load_config
from rlhf.tracking import read_samples
from stages import evaluate, ppo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    sft, rm = save_tiny_sft_and_reward(root)
    prompts = write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 40))
    held_out = write_jsonl(root / "held_out.jsonl", demo_rows("eval_prompts.jsonl", 40))
    out = ppo.run(load_config(PPOConfig, None, [
        f"run_dir={root / 'run'}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", f"data.eval_path={held_out}",
        "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=6",
        "rollout.score_norm=none", "ppo.num_updates=2", "ppo.num_minibatches=1", "ppo.micro_batch_size=4",
        "eval.num_prompts=4", "eval.gold_judge=false", "optim.learning_rate=1e-2"]))
    return root, sft, rm, out, held_out


def _cfg(setup, name, policy, *extra):
    root, sft, rm, _, held_out = setup
    return load_config(EvaluateConfig, None, [
        f"run_dir={root / name}", f"sft_model.name_or_path={sft}", f"ppo_model.name_or_path={policy}",
        f"reward_model.name_or_path={rm}", f"data.path={held_out}", "num_prompts=12", "max_new_tokens=6",
        "samples=5", *extra])


def test_evaluation_compares_the_policies_and_writes_eval_json(setup):
    _, _, _, ppo_out, _ = setup
    out = evaluate.run(_cfg(setup, "eval", ppo_out / "policy"))
    report = json.loads((out / evaluate.EVAL_FILE).read_text())
    assert report["num_prompts"] == 12 and report["sft"]["num_prompts"] == report["ppo"]["num_prompts"] == 12
    assert report["sft"]["kl"] == 0.0 and report["kl_ppo_to_reference"] != 0.0
    assert 0.0 <= report["win_rate_reward_model"] <= 1.0 and 0.0 <= report["win_rate_gold"] <= 1.0
    assert {"gold_combined", "gold_positive", "gold_grammatical", "score_mean", "response_len"} <= report["ppo"].keys()
    rows = [r for r in read_samples(out) if r["table"] == "eval_samples"]
    assert len(rows) == 5 and {"sft_response", "ppo_response", "sft_score", "ppo_score"} <= rows[0].keys()
    assert read_manifest(out)["eval"] == report


def test_onednn_packed_linears_give_the_same_evaluation(setup, monkeypatch):
    _, _, _, ppo_out, _ = setup
    packed_products = spy_on_packed_products(monkeypatch)
    reports = {}
    for flag in ("true", "false"):
        before = len(packed_products)
        flags = [f"{model}.onednn_linears={flag}" for model in ("sft_model", "ppo_model", "reward_model")]
        out = evaluate.run(_cfg(setup, f"eval-onednn-{flag}", ppo_out / "policy", *flags))
        reports[flag] = (json.loads((out / evaluate.EVAL_FILE).read_text()), len(packed_products) - before)
    assert reports["true"][1] > 0 and reports["false"][1] == 0
    packed, plain = reports["true"][0], reports["false"][0]
    for policy in ("sft", "ppo"):
        for key in ("score_mean", "kl", "response_len", "gold_combined"):
            assert packed[policy][key] == pytest.approx(plain[policy][key], rel=1e-5, abs=1e-5), (policy, key)


def test_a_policy_against_itself_ties_everywhere(setup):
    _, sft, _, _, _ = setup
    report = json.loads((evaluate.run(_cfg(setup, "self", sft)) / evaluate.EVAL_FILE).read_text())
    # The same weights on the same prompts and random streams give the same responses: every pair ties.
    assert report["win_rate_reward_model"] == 0.5 and report["win_rate_gold"] == 0.5
    assert report["kl_ppo_to_reference"] == 0.0
    assert report["ppo"] == report["sft"]


def test_win_rate_counts_ties_as_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_sigterm_stops_evaluation_before_its_next_batch_and_keeps_nothing(setup, monkeypatch):
    import signal

    from rlhf import evaluation
    from rlhf.signals import StageInterrupted

    _, _, _, ppo_out, _ = setup
    generate = evaluation.generate
    calls = []

    def generate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler would, during the first batch
        return generate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate", generate_then_signal)
    with pytest.raises(StageInterrupted, match="after 4 of 12 prompts; it keeps no partial results"):
        evaluate.run(_cfg(setup, "stopped", ppo_out / "policy", "batch_size=4"))
    assert len(calls) == 1
    out = setup[0] / "stopped" / "evaluate"
    assert read_manifest(out) is None and not (out / evaluate.EVAL_FILE).exists()

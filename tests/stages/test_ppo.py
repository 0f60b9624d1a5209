"""The PPO stage on tiny models: what one update changes and keeps, LoRA's reference, critic initialisation, scores
tokenised as in reward training, the missing-stop penalty, outputs, and resume after a fault."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from support import (demo_rows, plain_tokenizer, save_reward_model, save_tiny_causal_lm, save_tiny_sft_and_reward,
                     spy_on_packed_products, train_tokenizer, write_jsonl)

from rlhf.checkpoint import list_checkpoints, read_manifest
from rlhf.config import PPOConfig, load_config
from rlhf.errors import ConfigError
import rlhf.runtime
from rlhf.models import score_sequences
from rlhf.pipeline import build_missing_upstream, run_with_upstream
from rlhf.scoring import RewardScorer
from rlhf.signals import FAULT_ENV, InjectedFault
from rlhf.text import RewardText, TextContract
from rlhf.tracking import read_metrics
from stages import ppo

METRIC_NAMES = ("rollout/score_mean", "rollout/kl", "rollout/response_len", "rollout/eos_rate", "ppo/policy_loss",
                "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/explained_var",
                "ppo/kl_coef", "time/rollout_s", "time/train_s", "perf/tokens_per_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    sft, rm = save_tiny_sft_and_reward(root)
    prompts = demo_rows("prompts.jsonl", 80)
    eval_prompts = [r for r in demo_rows("eval_prompts.jsonl", 60) if r not in prompts][:12]
    return root, sft, rm, write_jsonl(root / "prompts.jsonl", prompts), write_jsonl(root / "eval.jsonl", eval_prompts)


def _cfg(setup, name, *extra):
    root, sft, rm, prompts, eval_prompts = setup
    return load_config(PPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", f"data.eval_path={eval_prompts}",
        "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=8",
        "rollout.score_norm=none", "ppo.num_updates=1", "ppo.ppo_epochs=2", "ppo.num_minibatches=2",
        "ppo.micro_batch_size=2", "eval.num_prompts=8", "eval.gold_judge=false", "optim.learning_rate=1e-2",
        "optim.lr_scheduler=constant", *extra,
    ])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_update_changes_policy_and_critic_and_keeps_reference_and_reward_model(setup):
    seen = {}
    out = ppo.run(_cfg(setup, "full"), on_update=lambda i, m: seen.__setitem__(i, (
        _snapshot(m.trained.policy), _snapshot(m.trained.critic), _snapshot(m.reference), _snapshot(m.reward_model))))
    (p0, c0, r0, rm0), (p1, c1, r1, rm1) = seen[0], seen[1]
    moved = lambda a, b, key: not torch.equal(a[key], b[key])  # noqa: E731
    # Every block weight of the policy and the critic trains (position embeddings past the longest sequence get no
    # gradient, so the embedding tables are left out).
    for before, after in ((p0, p1), (c0, c1)):
        block_keys = [k for k in before if ".h." in k]
        assert block_keys and all(moved(before, after, k) for k in block_keys)
    assert moved(c0, c1, "score.weight")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(torch.equal(rm0[k], rm1[k]) for k in rm0)

    rows = [r for r in read_metrics(out) if "rollout/kl" in r]
    assert len(rows) == 1 and all(name in rows[0] for name in METRIC_NAMES)
    # Before the first update the policy is the reference: the KL of the first rollout is 0 up to rounding (the
    # log-probs from generation's cached steps and the reference's full pass agree to 1e-5 per token).
    assert abs(rows[0]["rollout/kl"]) < 1e-5
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["critic_init"] == "reward"
    assert manifest["metrics"]["final/kl"] > 0 and manifest["metrics"]["initial/kl"] == 0

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    critic = AutoModelForSequenceClassification.from_pretrained(out / "value")
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(value, p1[key], rtol=0, atol=0)
    assert critic.config.num_labels == 1


def test_lora_reference_is_the_policy_with_adapters_disabled_and_base_weights_stay(setup):
    seen = {}
    out = ppo.run(_cfg(setup, "lora", "peft.method=lora", "peft.lora_r=4", "critic_peft.method=lora",
                       "critic_peft.lora_r=4"),
                  on_update=lambda i, m: seen.__setitem__(i, (m.reference, _snapshot(m.trained.policy))))
    (ref0, p0), (_, p1) = seen[0], seen[1]
    assert ref0 is None
    lora_b = [k for k in p0 if "lora_B" in k]
    base = [k for k in p0 if "lora_" not in k]
    assert lora_b and all(not torch.equal(p0[k], p1[k]) for k in lora_b)
    assert all(torch.equal(p0[k], p1[k]) for k in base)
    # The saved policy is merged: a plain causal LM whose weights differ from the SFT model's.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    sft = load_file(setup[1] / "model.safetensors")
    assert any(not torch.allclose(merged[k], sft[k]) for k in sft if k in merged)
    assert read_manifest(out)["reference"] == "adapters disabled"


def test_critic_from_policy_starts_with_a_zero_head(setup):
    seen = {}
    out = ppo.run(_cfg(setup, "critic-policy", "ppo.critic_init=policy"),
                  on_update=lambda i, m: seen.__setitem__(i, _snapshot(m.trained.critic)))
    assert torch.count_nonzero(seen[0]["score.weight"]) == 0
    assert torch.count_nonzero(seen[1]["score.weight"]) > 0
    assert read_manifest(out)["critic_init"] == "policy"


def _pairs():
    rows = demo_rows("preferences.jsonl", 6)
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows]


@pytest.mark.parametrize("tokenizers", ["shared", "different"])
def test_ppo_score_equals_the_reward_stages_score(setup, tmp_path, tokenizers):
    from transformers import AutoModelForSequenceClassification

    _, sft, rm_dir, _, _ = setup
    policy_tokenizer = plain_tokenizer()
    if tokenizers == "different":
        other = train_tokenizer(["<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>", bos="<s>", vocab_size=280)
        base = save_tiny_causal_lm(tmp_path / "other-base", other, seed=3)
        rm_dir = save_reward_model(tmp_path / "other-rm", base, other, seed=4)
    reward_tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    contract = TextContract.from_tokenizer(policy_tokenizer)
    scorer = RewardScorer(model, reward_tokenizer, policy_contract=contract, is_encoder=False, batch_size=4)
    assert scorer.shares_tokens == (tokenizers == "shared")

    prompts, responses = _pairs()
    prompt_ids = [contract.prompt_ids(p) for p in prompts]
    # What PPO holds after sampling: the response's token ids through the stop token.
    response_ids = [contract.response_ids(p, r) for p, r in zip(prompts, responses)]
    assert len({len(r) for r in response_ids}) > 1  # different lengths in one padded batch
    ppo_scores = scorer.score(prompts, prompt_ids, response_ids)
    # What the reward stage computes for the same pair (encode_pair, then score_sequences), one at a time.
    text = RewardText.for_model(reward_tokenizer, is_encoder=False)
    stage_scores = torch.cat([score_sequences(model, [text.ids(p, r)], pad_token_id=reward_tokenizer.pad_token_id)
                              for p, r in zip(prompts, responses)])
    torch.testing.assert_close(ppo_scores, stage_scores, atol=1e-5, rtol=0)


def test_scores_are_read_at_the_last_real_token_of_each_response(setup):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, _, rm_dir, _, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    contract = TextContract.from_tokenizer(tokenizer)
    scorer = RewardScorer(model, tokenizer, policy_contract=contract, is_encoder=False)
    prompts, responses = _pairs()
    prompt_ids = [contract.prompt_ids(p) for p in prompts]
    response_ids = [contract.response_ids(p, r) for p, r in zip(prompts, responses)]
    batched = scorer.score(prompts, prompt_ids, response_ids)
    # The score head's output at the last real token, computed by hand on each unpadded sequence.
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        hidden = model.transformer(input_ids=torch.tensor([p + r])).last_hidden_state
        expected = model.score(hidden)[0, -1, 0]
        torch.testing.assert_close(batched[i], expected.detach(), atol=1e-5, rtol=0)


def test_missing_stop_penalty_and_score_normalisation():
    raw = torch.tensor([1.0, 3.0, 5.0])
    stopped = torch.tensor([True, False, True])
    scores = ppo.final_scores(raw, stopped, {"mean": 3.0, "std": 2.0}, missing_stop_penalty=0.5, clip=None)
    torch.testing.assert_close(scores, torch.tensor([-1.0, -0.5, 1.0]))
    clipped = ppo.final_scores(raw, stopped, None, missing_stop_penalty=1.0, clip=2.5)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 2.0, 2.5]))


def test_missing_stop_penalty_reaches_the_rewards(setup):
    # Two new tokens never reach a stop token on a random model: every response is penalised.
    out = ppo.run(_cfg(setup, "penalty", "rollout.max_new_tokens=2", "rollout.missing_stop_penalty=3.0"))
    row = [r for r in read_metrics(out) if "rollout/kl" in r][0]
    assert row["rollout/eos_rate"] < 0.5
    penalised = 1.0 - row["rollout/eos_rate"]
    assert row["rollout/reward_mean"] == pytest.approx(row["rollout/score_mean"] - 3.0 * penalised, abs=1e-5)


def test_batch_layout_errors_name_the_keys():
    cfg = load_config(PPOConfig, None, ["rollout.batch_size=10", "ppo.num_minibatches=4"])
    with pytest.raises(ConfigError, match="ppo.num_minibatches=4"):
        cfg.batch_layout(1)
    with pytest.raises(ConfigError, match="rollout.batch_size=10 is not a multiple of the 4 processes"):
        cfg.batch_layout(4)
    cfg = load_config(PPOConfig, None, ["rollout.batch_size=12", "ppo.num_minibatches=1", "ppo.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="ppo.micro_batch_size=5"):
        cfg.batch_layout(1)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "perf/"))} for r in rows]


@pytest.mark.parametrize("fault", ["after_checkpoint:2", "checkpoint_write:2"])
def test_resume_after_a_fault_matches_an_uninterrupted_run_bitwise(setup, monkeypatch, fault):
    extra = ["ppo.num_updates=4", "checkpoint.save_every=1", "checkpoint.keep_last=2", "eval.every=2"]
    straight = ppo.run(_cfg(setup, f"straight-{fault}", *extra))

    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(InjectedFault):
        ppo.run(_cfg(setup, f"resumed-{fault}", *extra))
    stopped = straight.parent.parent / f"resumed-{fault}" / "ppo"
    assert read_manifest(stopped) is None
    # Stopped part-way through writing checkpoint 2, only checkpoint 1 is complete.
    assert list_checkpoints(stopped)[-1] == (2 if fault.startswith("after") else 1)
    monkeypatch.delenv(FAULT_ENV)
    resumed = ppo.run(_cfg(setup, f"resumed-{fault}", *extra, "checkpoint.resume=true"))

    for part in ("policy", "value"):
        a, b = load_file(straight / part / "model.safetensors"), load_file(resumed / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(read_metrics(straight)) == _comparable(read_metrics(resumed))
    assert list_checkpoints(resumed) == [3, 4]


def test_bfloat16_models_keep_logprobs_values_and_advantages_in_float32(setup):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.ppo.rollout import policy_forward, token_values

    _, sft, rm, _, _ = setup
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.bfloat16)
    logprobs, entropy = policy_forward(policy, ids, mask, 3, temperature=0.7, with_entropy=True)
    critic = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.bfloat16)
    assert logprobs.dtype == entropy.dtype == token_values(critic, ids, mask, 3).dtype == torch.float32

    seen = {}
    out = ppo.run(_cfg(setup, "bf16", "model.dtype=bfloat16", "reward_model.dtype=bfloat16"),
                  on_update=lambda i, m: seen.__setitem__(i, next(m.trained.policy.parameters()).dtype))
    assert seen[0] == torch.bfloat16
    row = [r for r in read_metrics(out) if "rollout/kl" in r][0]
    assert all(torch.isfinite(torch.tensor(float(row[k]))) for k in METRIC_NAMES)
    assert row["rollout/kl"] == 0.0  # policy and reference are the same bf16 weights before the first update


def test_missing_upstream_with_several_processes_names_the_command(setup, monkeypatch):
    from types import SimpleNamespace

    from rlhf.errors import CheckpointError

    root = setup[0]
    cfg = load_config(PPOConfig, None, [f"run_dir={root / 'fresh'}"])
    monkeypatch.setattr(rlhf.runtime, "distributed_state",
                        lambda: SimpleNamespace(num_processes=2, is_main_process=True))
    with pytest.raises(CheckpointError, match=r"accelerate launch launch/sft.py run_dir=.*fresh"):
        build_missing_upstream(cfg)


def test_onednn_packed_linears_run_the_same_update(setup, monkeypatch):
    packed_products = spy_on_packed_products(monkeypatch)
    runs = {}
    for flag in ("true", "false"):
        before = len(packed_products)
        out = ppo.run(_cfg(setup, f"onednn-{flag}", f"model.onednn_linears={flag}",
                           f"reward_model.onednn_linears={flag}"))
        rows = [r for r in read_metrics(out) if "rollout/kl" in r]
        runs[flag] = (rows[0], load_file(out / "policy" / "model.safetensors"), len(packed_products) - before)
    # Generation, the scoring passes and training all went through the packed kernel; nothing did when switched off.
    assert runs["true"][2] > 0 and runs["false"][2] == 0
    # Equal up to float32 rounding: the untrained critic's value loss is near 100 here, where the kernels' different
    # summation orders show at 2e-5 relative; the weights after the update agree to 1e-5.
    for key in ("rollout/score_mean", "rollout/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy"):
        assert runs["true"][0][key] == pytest.approx(runs["false"][0][key], rel=1e-4, abs=1e-5), key
    for name, tensor in runs["false"][1].items():
        assert torch.allclose(runs["true"][1][name], tensor, atol=1e-5), name


def test_micro_batches_accumulate_to_the_minibatch_gradient(setup):
    """A minibatch cut into micro-batches takes the same optimiser step as the minibatch in one pass: the losses
    are token sums over the whole minibatch's tokens and the optimiser steps once per minibatch. (A large Adam
    epsilon keeps the step proportional to the gradient: with the default, weights whose true gradient is 0, such as
    the attention's key biases, would move by the learning rate in the direction of float32 rounding noise.)"""
    before, after = {}, {}
    for micro in (4, 2, 1):
        seen = {}
        ppo.run(_cfg(setup, f"micro{micro}", f"ppo.micro_batch_size={micro}", "optim.max_grad_norm=0",
                     "optim.adam_epsilon=1e-2"),
                on_update=lambda i, m: seen.__setitem__(i, (_snapshot(m.trained.policy),
                                                            _snapshot(m.trained.critic))))
        before[micro], after[micro] = seen[0], seen[1]
    moved = max((a[k] - b[k]).abs().max().item() for b, a in zip(before[4], after[4]) for k in a)
    assert moved > 1e-3
    for micro in (2, 1):
        for whole, split in zip(after[4], after[micro]):
            for key in whole:
                torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("critic_init", ["reward", "policy"])
def test_critic_from_the_reward_model_is_read_in_normalised_score_units(setup, monkeypatch, critic_init):
    """The returns are in normalised-score units, so a critic started from the reward model (whose outputs are raw
    scores) is read through the same normalisation; a critic started from the policy is read as it is."""
    raw, groups, seen = [], [], {}
    import rlhf.ppo.speed

    original_values, original_gae, original_groups = ppo.token_values, ppo.gae, rlhf.ppo.speed.length_groups

    def token_values(*args, **kwargs):
        out = original_values(*args, **kwargs)
        if "values" not in seen:  # the rollout's passes, before its advantages
            raw.append(out.clone())
        return out

    def length_groups(*args, **kwargs):
        out = original_groups(*args, **kwargs)
        if "values" not in seen:
            groups.extend(out)
        return out

    def gae(rewards, values, mask, **kwargs):
        seen.setdefault("values", values.clone())
        seen.setdefault("mask", mask.clone())
        return original_gae(rewards, values, mask, **kwargs)

    monkeypatch.setattr(ppo, "token_values", token_values)
    monkeypatch.setattr(rlhf.ppo.speed, "length_groups", length_groups)
    monkeypatch.setattr(ppo, "gae", gae)
    out = ppo.run(_cfg(setup, f"units-{critic_init}", "rollout.score_norm=first_rollout",
                       f"ppo.critic_init={critic_init}"))
    stats = read_manifest(out)["score_norm"]
    assert stats["std"] > 0 and abs(stats["mean"]) > 1e-3
    # The rollout's value passes ran over groups of rows; put their outputs back in row order.
    assert len(raw) == len(groups)
    raw_values = torch.zeros_like(seen["values"])
    for rows, values in zip(groups, raw):
        raw_values[rows, :values.shape[1]] = values
    expected = (raw_values - stats["mean"]) / stats["std"] if critic_init == "reward" else raw_values
    mask = seen["mask"]
    torch.testing.assert_close(seen["values"][mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_rollout_passes_over_length_groups_equal_one_pass_over_the_padded_batch(setup, monkeypatch):
    """The critic's, the reference's and the reward model's passes over a rollout run on groups of rows of similar
    lengths, each without its all-padding columns; the values, KL-shaped rewards and scores equal those of one pass
    over the whole padded batch."""
    import rlhf.models
    import rlhf.ppo.speed

    def capture(name):
        seen = {}

        def gae(rewards, values, mask, **kwargs):
            seen.setdefault("rewards", rewards.clone())
            seen.setdefault("values", values.clone())
            seen.setdefault("mask", mask.clone())
            return ppo_gae(rewards, values, mask, **kwargs)

        monkeypatch.setattr(ppo, "gae", gae)
        ppo.run(_cfg(setup, name, "rollout.micro_batch_size=2"))
        return seen

    ppo_gae = ppo.gae
    widths = []
    original_select = ppo.Rollout.select

    def select(self, rows):
        part = original_select(self, rows)
        widths.append((part.input_ids.shape[1], self.input_ids.shape[1]))
        return part

    monkeypatch.setattr(ppo.Rollout, "select", select)
    grouped = capture("grouped")
    # Some group of the first rollout ran narrower than the whole batch: the test exercises the trimming.
    assert any(narrow < full for narrow, full in widths)

    def one_group(lengths, max_rows, **kwargs):
        return [list(range(len(lengths)))]

    monkeypatch.setattr(rlhf.ppo.speed, "length_groups", one_group)
    monkeypatch.setattr(rlhf.models, "length_groups", one_group)
    plain = capture("plain")
    assert torch.equal(grouped["mask"], plain["mask"])
    mask = plain["mask"]
    for key in ("values", "rewards"):
        torch.testing.assert_close(grouped[key][mask], plain[key][mask], atol=1e-5, rtol=1e-5)


def _update_rows(out):
    return [r for r in read_metrics(out) if "rollout/kl" in r]


def test_entropy_coef_changes_the_update(setup):
    """ppo.entropy_coef adds the entropy bonus to the loss: the same rollout trains to other weights, and the
    logged entropy is the policy's before the step either way."""
    seen = {}
    for coef in (0.0, 2.0):
        ppo.run(_cfg(setup, f"entropy-{coef}", f"ppo.entropy_coef={coef}"),
                on_update=lambda i, m, coef=coef: seen.__setitem__((coef, i), _snapshot(m.trained.policy)))
    assert all(torch.equal(seen[0.0, 0][k], seen[2.0, 0][k]) for k in seen[0.0, 0])
    block_keys = [k for k in seen[0.0, 1] if ".h." in k]
    assert any(not torch.allclose(seen[0.0, 1][k], seen[2.0, 1][k], rtol=0, atol=1e-6) for k in block_keys)


def test_lora_dropout_is_off_while_training(setup):
    """peft.lora_dropout applies to SFT and reward training; in PPO the training forward must compute the function
    the rollout's did. One epoch of one minibatch: every forward comes before the step, so the ratio is 1."""
    out = ppo.run(_cfg(setup, "lora-dropout", "peft.method=lora", "peft.lora_r=4", "peft.lora_dropout=0.5",
                       "ppo.num_updates=2", "ppo.ppo_epochs=1", "ppo.num_minibatches=1"))
    second = _update_rows(out)[1]  # the adapters' B matrices are 0 before the first update, so dropout shows later
    assert second["ppo/approx_kl"] < 1e-9
    assert second["ppo/clipfrac"] == 0.0
    assert second["ppo/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert second["ppo/logprob_gap"] < 1e-5


def test_bf16_mixed_precision_scores_the_rollout_in_the_training_precision(setup, monkeypatch):
    """Under accelerate's bf16 autocast the parameters stay float32 but the training forward computes in bf16: the
    rollout's log-probs cannot come from generation's float32 logits, and the reference runs in bf16 too. One epoch of
    one minibatch: the first ratio is 1 and the first KL 0, within bf16 rounding."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    # The tiny model's logits are small, and so are their bf16 rounding errors; a low temperature scales them up.
    out = ppo.run(_cfg(setup, "bf16-autocast", "ppo.ppo_epochs=1", "ppo.num_minibatches=1",
                       "rollout.temperature=0.05"))
    row = _update_rows(out)[0]
    assert read_manifest(out)["status"] == "complete"
    # Measured: approx_kl 2.5e-9, ratio 1 + 1e-5, log-prob gap 1.1e-5; with float32 rollout log-probs against the
    # bf16 training forward, approx_kl 1.4e-5 and ratio 1 + 4.7e-4.
    assert abs(row["rollout/kl"]) < 1e-6
    assert row["ppo/approx_kl"] < 1e-7
    assert row["ppo/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert row["ppo/logprob_gap"] < 1e-4


def test_no_missing_stop_penalty_when_responses_do_not_stop(setup):
    """rollout.stop_at_stop_token=false samples max_new_tokens for every response: none counts as cut short."""
    out = ppo.run(_cfg(setup, "no-stop", "rollout.stop_at_stop_token=false", "rollout.missing_stop_penalty=3.0"))
    row = _update_rows(out)[0]
    assert row["rollout/response_len"] == 8
    assert row["rollout/reward_mean"] == pytest.approx(row["rollout/score_mean"], abs=1e-6)


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_the_learning_rate_schedule_ends_at_its_final_rate_when_epochs_stop_early(setup, scheduler):
    """ppo.target_kl cuts every update to its first epoch; the schedule still reaches its end with the last update."""
    out = ppo.run(_cfg(setup, f"schedule-{scheduler}", f"optim.lr_scheduler={scheduler}", "ppo.num_updates=3",
                       "ppo.ppo_epochs=3", "ppo.target_kl=1e-9"))
    rows = _update_rows(out)
    assert [r["ppo/epochs"] for r in rows] == [1, 1, 1]
    assert rows[-1]["ppo/lr"] == pytest.approx(0.0, abs=1e-12)
    # Each update takes its share of the schedule: a third of the way per update for a linear one.
    if scheduler == "linear":
        assert [r["ppo/lr"] for r in rows] == pytest.approx([1e-2 * 2 / 3, 1e-2 / 3, 0.0])


def test_a_run_written_outside_its_run_directory_exits_0_without_a_report(setup, tmp_path, capsys, caplog):
    """launch/ppo.py with output_dir elsewhere and a run_dir that does not exist trains, completes its output and
    exits 0: there is no run directory to draw a report from, and one info line says so."""
    import logging

    from rlhf.launcher import launch

    root, sft, rm, prompts, eval_prompts = setup
    run_dir, elsewhere = tmp_path / "a" / "new" / "dir", tmp_path / "elsewhere"
    argv = [f"run_dir={run_dir}", f"output_dir={elsewhere}", f"model.name_or_path={sft}",
            f"reward_model.name_or_path={rm}", f"data.path={prompts}", f"data.eval_path={eval_prompts}",
            "checks.min_eos_rate=0",
            "rollout.batch_size=8", "rollout.max_new_tokens=8", "rollout.score_norm=none", "ppo.num_updates=1",
            "ppo.micro_batch_size=2", "eval.num_prompts=8", "eval.gold_judge=false"]
    with caplog.at_level(logging.INFO, logger="rlhf.pipeline"):
        status = launch(functools.partial(run_with_upstream, run_ppo=ppo.run), ppo.Config, default_config=None,
                        prog="launch/ppo.py", argv=argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert read_manifest(elsewhere)["status"] == "complete"
    assert "held-out" in captured.out and "report:" not in captured.out
    assert sum("ppo: no report" in r.getMessage() for r in caplog.records) == 1
    assert not run_dir.exists()

"""The PPO update's phases, each called directly on the tiny models: generate → score → advantages → optimise; and
the speed paths (`rlhf.ppo.speed`) against the plain path on one rollout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support import demo_rows, save_tiny_sft_and_reward, spy_on_packed_products, write_jsonl

from rlhf.config import PPOConfig, load_config
from rlhf.ppo.speed import SpeedPaths
from rlhf.runtime import distributed_state
from stages import ppo


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    sft, rm = save_tiny_sft_and_reward(root)
    return root, sft, rm, write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", 16))


def config(files, *extra: str) -> PPOConfig:
    root, sft, rm, prompts = files
    return load_config(PPOConfig, None, [
        f"run_dir={root / 'run'}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", "data.eval_path=null",
        "checks.min_eos_rate=0", "rollout.batch_size=8", "rollout.max_new_tokens=8",
        "rollout.micro_batch_size=4", "rollout.score_norm=first_rollout", "ppo.num_updates=1", "ppo.ppo_epochs=1",
        "ppo.num_minibatches=2", "ppo.micro_batch_size=2", "optim.learning_rate=1e-2", "optim.lr_scheduler=constant",
        *extra,
    ])


def build(cfg: PPOConfig) -> tuple[ppo.Inputs, ppo.Models]:
    from accelerate import Accelerator

    state = distributed_state()
    inputs = ppo.read_inputs(cfg, state)
    layout = cfg.batch_layout(state.num_processes)
    models = ppo.build_models(cfg, Accelerator(gradient_accumulation_steps=layout.micro_batches), inputs, layout)
    return inputs, models


def rollout_of(cfg: PPOConfig, inputs: ppo.Inputs, models: ppo.Models, indices=range(8)) -> ppo.Rollout:
    prompt_ids = [inputs.train_prompts.prompt_ids[i] for i in indices]
    models.scoring.unwrapped.eval()
    with torch.inference_mode(), models.scoring.inference():
        return ppo.generate_rollout(cfg, models.scoring, prompt_ids, list(indices))


def scored_of(inputs: ppo.Inputs, models: ppo.Models, rollout: ppo.Rollout, indices=range(8)) -> ppo.ScoredRollout:
    seconds = {"policy_value_s": 0.0, "reference_s": 0.0, "reward_s": 0.0}
    with torch.inference_mode(), models.scoring.inference():
        scored = ppo.score_rollout(models.scoring, rollout, [inputs.train_prompts.prompts[i] for i in indices],
                                   seconds)
    assert all(value >= 0 for value in seconds.values())
    return scored


def shaped_of(cfg, models, rollout, scored, kl_coef=0.1) -> tuple[ppo.ShapedRollout, dict]:
    accelerator = models.training.accelerator
    stats = ppo.first_rollout_stats(accelerator, scored.raw_scores)
    return ppo.rewards_and_advantages(cfg, accelerator, rollout, scored, stats, kl_coef, models.critic_source), stats


@pytest.fixture(scope="module")
def built(files):
    cfg = config(files)
    inputs, models = build(cfg)
    rollout = rollout_of(cfg, inputs, models)
    return cfg, inputs, models, rollout


def test_generate_rollout_draws_each_sample_from_its_own_stream(built):
    cfg, inputs, models, rollout = built
    assert rollout.response_ids.shape == (8, rollout.response_mask.shape[1])
    assert rollout.response_mask.shape[1] <= cfg.rollout.max_new_tokens
    # Right-padded responses: a row's mask is ones, then zeros.
    mask = rollout.response_mask.long()
    assert torch.equal(mask, mask.cummin(dim=1).values)
    # The sample of global index i depends on i alone, not on the rows it was generated with.
    again = rollout_of(cfg, inputs, models, indices=[5, 2])
    for row, index in enumerate([5, 2]):
        length = int(again.response_mask[row].sum())
        assert length == int(rollout.response_mask[index].sum())
        assert torch.equal(again.response_ids[row, :length], rollout.response_ids[index, :length])


def test_score_rollout_starts_with_the_policy_equal_to_its_reference(built):
    cfg, inputs, models, rollout = built
    scored = scored_of(inputs, models, rollout)
    mask = rollout.response_mask
    for name in ("old_logprobs", "old_values", "ref_logprobs"):
        tensor = getattr(scored, name)
        assert tensor.shape == mask.shape and torch.isfinite(tensor).all(), name
    assert (scored.old_logprobs[mask] < 0).all()
    torch.testing.assert_close(scored.old_logprobs[mask], scored.ref_logprobs[mask], atol=1e-5, rtol=0)
    assert scored.raw_scores.shape == (8,) and scored.raw_scores.std() > 0


def test_rewards_and_advantages_put_the_score_on_the_last_token(built):
    cfg, inputs, models, rollout = built
    scored = scored_of(inputs, models, rollout)
    shaped, stats = shaped_of(cfg, models, rollout, scored, kl_coef=0.0)
    mask = rollout.response_mask
    # Without the KL term each response's rewards add up to its final (normalised) score.
    torch.testing.assert_close((shaped.rewards * mask).sum(-1), shaped.scores)
    expected = (scored.raw_scores - stats["mean"]) / stats["std"] - (~rollout.stopped).float()
    torch.testing.assert_close(shaped.scores, expected)
    # Advantages whitened over the response tokens.
    assert abs(shaped.advantages[mask].mean().item()) < 1e-5
    assert shaped.returns.shape == mask.shape and torch.isfinite(shaped.returns[mask]).all()


def test_optimise_takes_one_step_per_minibatch_and_reports_named_statistics(files):
    cfg = config(files, "ppo.ppo_epochs=2")
    inputs, models = build(cfg)
    rollout = rollout_of(cfg, inputs, models)
    scored = scored_of(inputs, models, rollout)
    shaped, stats = shaped_of(cfg, models, rollout, scored)
    before = {k: v.detach().clone() for k, v in models.training.unwrapped.state_dict().items()}
    batch = ppo.Batch(*(ppo.clone_tree(x) for x in (rollout, scored.old_logprobs, scored.ref_logprobs,
                                                     shaped.old_values, shaped.advantages, shaped.returns)))
    result = ppo.optimise(cfg, models.training, batch, 0, skip=None, critic_source=models.critic_source,
                          score_stats=stats)
    assert (result.optimizer_steps, result.epochs, result.bad) == (4, 2, None)
    after = models.training.unwrapped.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    means = result.reduced(models.training.accelerator, cfg.ppo.num_minibatches)
    assert list(means) == [*ppo.LOSS_METRICS, "ppo/logprob_gap", "perf/train_passes", "perf/train_padding"]
    # Two epochs of two minibatches of 4 rows, each in passes of 2 rows; some positions of them are padding.
    assert means["perf/train_passes"] == 2 * 2 * 2
    assert 0 <= means["perf/train_padding"] < 1
    assert means["ppo/logprob_gap"] < 1e-5  # the first minibatch scores what the rollout scored
    assert 0 <= means["ppo/clipfrac"] <= 1 and means["ppo/entropy"] > 0


def test_optimise_skips_an_update_with_non_finite_inputs(built):
    cfg, inputs, models, rollout = built
    scored = scored_of(inputs, models, rollout)
    shaped, stats = shaped_of(cfg, models, rollout, scored)
    scored.raw_scores = scored.raw_scores.clone()
    scored.raw_scores[0] = float("nan")
    shaped_bad, _ = shaped_of(cfg, models, rollout, scored)
    bad = ppo.non_finite_input(models.training.accelerator, rollout, scored, shaped_bad)
    assert bad == "reward-model scores"
    before = {k: v.detach().clone() for k, v in models.training.unwrapped.state_dict().items()}
    batch = ppo.Batch(rollout, scored.old_logprobs, scored.ref_logprobs, shaped.old_values, shaped.advantages,
                      shaped.returns)
    result = ppo.optimise(cfg, models.training, ppo.clone_tree(batch), 0, skip=bad,
                          critic_source=models.critic_source, score_stats=stats)
    assert (result.optimizer_steps, result.epochs, result.bad) == (0, 0, bad)
    assert all(torch.equal(before[k], v) for k, v in models.training.unwrapped.state_dict().items())


class GradientRecorder:
    """Stands in for the optimiser: records each step's gradients and leaves the weights as they are."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.steps = model, []

    def step(self) -> None:
        self.steps.append({name: p.grad.detach().clone() for name, p in self.model.named_parameters()
                           if p.grad is not None})

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None


def test_speed_paths_and_the_plain_path_agree_on_one_rollout(files, monkeypatch):
    packed = spy_on_packed_products(monkeypatch)
    results = {}
    rollout = None
    for flag in ("true", "false"):
        cfg = config(files, f"speed_paths={flag}")
        inputs, models = build(cfg)
        expected = flag == "true"
        assert models.scoring.speed == models.training.speed
        assert all(getattr(models.scoring.speed, f) == expected for f in ("reuse_logprobs", "pack_trained",
                                                                          "reserved_cache", "by_length"))
        assert models.scoring.settings.reserved_cache == expected
        if rollout is None:
            rollout = rollout_of(cfg, inputs, models)  # the speed paths' rollout, sent through both
        count = len(packed)
        scored = scored_of(inputs, models, ppo.clone_tree(rollout))
        shaped, stats = shaped_of(cfg, models, rollout, scored)
        recorder = GradientRecorder(models.training.unwrapped)
        training = dataclasses.replace(models.training, optimizer=recorder)
        batch = ppo.Batch(*(ppo.clone_tree(x) for x in (rollout, scored.old_logprobs, scored.ref_logprobs,
                                                         shaped.old_values, shaped.advantages, shaped.returns)))
        stats_out = ppo.optimise(cfg, training, batch, 0, skip=None, critic_source=models.critic_source,
                                 score_stats=stats)
        assert (len(packed) > count) == expected  # the speed path ran packed products, the plain one none
        results[flag] = (scored, stats_out.reduced(training.accelerator, cfg.ppo.num_minibatches), recorder.steps)

    (fast_scored, fast_losses, fast_grads), (plain_scored, plain_losses, plain_grads) = results["true"], results["false"]
    mask = rollout.response_mask
    for name in ("old_logprobs", "old_values", "ref_logprobs"):
        torch.testing.assert_close(getattr(fast_scored, name)[mask], getattr(plain_scored, name)[mask],
                                   atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(fast_scored.raw_scores, plain_scored.raw_scores, atol=1e-5, rtol=0)
    assert list(fast_losses) == list(plain_losses)
    for name in fast_losses:
        if name != "perf/train_padding":
            assert fast_losses[name] == pytest.approx(plain_losses[name], abs=1e-5), name
    # Micro-batches of rows of similar lengths pad less.
    assert fast_losses["perf/train_padding"] < plain_losses["perf/train_padding"]
    assert len(fast_grads) == len(plain_grads) == 2  # one per minibatch
    for fast, plain in zip(fast_grads, plain_grads):
        assert fast.keys() == plain.keys() and fast
        for name in fast:
            torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_plain_path_is_one_flag(files):
    cfg = config(files, "speed_paths=false")
    paths = SpeedPaths.chosen(cfg, pack_trained=True, pack_reward=True, training_dtype=torch.float32)
    assert paths == SpeedPaths()
    assert paths.scoring_groups([5, 1, 3], 2, equal_count=False) == [[0, 1], [2]]
    assert ppo.speed.model_config(cfg, cfg.model).fused_activations is False
    fast = SpeedPaths.chosen(config(files), pack_trained=True, pack_reward=False, training_dtype=torch.bfloat16)
    assert fast.by_length and fast.pack_trained and not fast.pack_reward and not fast.reuse_logprobs

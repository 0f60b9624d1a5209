"""Micro-batches packed by tokens (``ppo.micro_batch_tokens``): every row trained once, no pass over its budget,
the same number of passes on every process, and the gradient of fixed-size micro-batches for every loss the PPO
stage offers."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from support import tiny_ppo_inputs

from rlhf.config import PPOConfig, load_config
from rlhf.errors import ConfigError
from rlhf.ppo.micro_batches import micro_batches, pack_by_tokens, padded_positions
from rlhf.tracking import read_metrics
from stages import ppo


def _lengths(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 20, (n,), generator=g), torch.randint(1, 30, (n,), generator=g)


@pytest.mark.parametrize("seed", range(5))
def test_packing_trains_every_row_once_within_the_budget(seed):
    prompt, response = _lengths(seed, 40)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:24]
    passes = pack_by_tokens(rows, prompt, response, max_tokens=120)
    assert sorted(torch.cat(passes).tolist()) == sorted(rows.tolist())
    assert all(padded_positions(p, prompt, response) <= 120 for p in passes)
    # Greedy: the next row would not have fitted in the pass before it.
    for before, after in zip(passes, passes[1:]):
        assert padded_positions(torch.cat([before, after[:1]]), prompt, response) > 120
    # Fewer passes than fixed micro-batches of the rows the budget holds at the longest row.
    assert len(passes) < len(rows) / (120 // 49)


@pytest.mark.parametrize("num_processes", [2, 3])
def test_every_process_runs_as_many_passes(num_processes):
    prompt, response = _lengths(7, 48)
    # One process gets the long rows: it needs more passes, and the others split theirs to match.
    response[0::num_processes] = 29
    rows = torch.arange(48)
    shares = [micro_batches(rows, p, num_processes, max_rows=4, max_tokens=100, prompt_lengths=prompt,
                            response_lengths=response) for p in range(num_processes)]
    packed = [len(pack_by_tokens(rows[p::num_processes], prompt, response, 100)) for p in range(num_processes)]
    assert len(set(packed)) > 1, "the test needs processes whose packing differs"
    assert {len(s) for s in shares} == {max(packed)}
    for p, passes in enumerate(shares):
        assert sorted(torch.cat(passes).tolist()) == rows[p::num_processes].tolist()
        assert all(padded_positions(x, prompt, response) <= 100 for x in passes)
    # Without a budget: every N-th row, in fixed-size passes, as before.
    assert [x.tolist() for x in micro_batches(rows, 1, 2, max_rows=8, max_tokens=None, prompt_lengths=prompt,
                                              response_lengths=response)] == [rows[1::2][:8].tolist(),
                                                                               rows[1::2][8:16].tolist(),
                                                                               rows[1::2][16:].tolist()]


def test_a_budget_below_the_longest_row_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ppo.micro_batch_tokens=40 .* raise it to 88"):
        load_config(PPOConfig, None, ["ppo.micro_batch_tokens=40", "rollout.max_prompt_len=64",
                                      "rollout.max_new_tokens=24"]).validate()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_ppo_inputs(tmp_path_factory.mktemp("ppo_tokens"), prompts=80, eval_prompts=8)


def _first_gradient(setup, name, *extra):
    """The gradient of every trained parameter at the run's first optimiser step, and the run's metrics."""
    root, sft, rm, prompts, eval_prompts = setup
    cfg = load_config(PPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", f"data.eval_path={eval_prompts}", "checks.min_eos_rate=0", "rollout.batch_size=8",
        "rollout.max_new_tokens=8", "rollout.max_prompt_len=32", "rollout.score_norm=none", "ppo.num_updates=1",
        "ppo.ppo_epochs=1", "ppo.num_minibatches=1", "eval.num_prompts=4", "eval.gold_judge=false",
        "logging.report_to=[jsonl]", "optim.max_grad_norm=0", *extra])
    grads = []

    def record(optimizer, args, kwargs):
        if not grads:
            grads.extend(p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]
                         if p.grad is not None)

    handle = register_optimizer_step_pre_hook(record)
    try:
        out = ppo.run(cfg)
    finally:
        handle.remove()
    return grads, [r for r in read_metrics(out) if "perf/train_passes" in r][0]


@pytest.mark.parametrize("loss", [
    ["ppo.loss_aggregation=token_mean"],
    ["ppo.loss_aggregation=seq_mean_token_mean", "ppo.entropy_coef=0.01"],
    ["ppo.loss_aggregation=seq_mean_token_sum_norm"],
    ["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_penalty=loss",
     "ppo.loss_aggregation=seq_mean_token_mean"],
], ids=["token_mean", "seq_mean_token_mean+entropy", "seq_mean_token_sum_norm", "grpo+kl_loss"])
def test_token_budget_gives_the_gradient_of_fixed_micro_batches(setup, loss):
    name = loss[0].split("=")[1]
    rows, by_rows = _first_gradient(setup, f"rows-{name}", "ppo.micro_batch_size=4", *loss)
    tokens, by_tokens = _first_gradient(setup, f"tokens-{name}", "ppo.micro_batch_tokens=48", *loss)
    # The two splits differ: two passes of four rows against more, smaller passes.
    assert by_rows["perf/train_passes"] == 2 and by_tokens["perf/train_passes"] > 2
    assert len(rows) == len(tokens) and rows
    assert max(g.abs().max().item() for g in rows) > 1e-3
    # Equal up to float32 summation order (relative 4e-7 at most seen, on gradients up to about 5).
    for a, b in zip(rows, tokens):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)

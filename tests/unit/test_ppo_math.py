from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.ppo.advantages import gae, shaped_rewards
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_per_token
from rlhf.ppo.losses import entropy_from_logits, explained_variance, logprobs_from_logits, policy_loss, value_loss
from rlhf.ppo.masked import masked_mean, masked_sum, mean_var, moments, whiten

F64 = dict(atol=1e-6, rtol=1e-6)
F32 = dict(atol=1e-5, rtol=1e-5)
STAT = dict(atol=1e-6, rtol=1e-6, check_dtype=False)  # stats are normalised by a float32 token count


def t64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def prefix_mask(lengths, width):
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# --- masked -------------------------------------------------------------------------------------------------------


X = t64([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_ignores_padding():
    assert_close(masked_sum(X, M), t64(7.0), **F64)
    assert_close(masked_sum(X, M, dim=-1), t64([3.0, 4.0]), **F64)
    assert_close(masked_sum(X, M, dim=0), t64([5.0, 2.0, 0.0]), **F64)


def test_masked_mean_ignores_padding():
    assert_close(masked_mean(X, M), t64(7.0 / 3.0), **F64)
    assert_close(masked_mean(X, M, dim=-1), t64([1.5, 4.0]), **F64)
    # third column has no valid entry -> 0
    assert_close(masked_mean(X, M, dim=0), t64([2.5, 2.0, 0.0]), **F64)


def test_masked_mean_of_all_invalid_row_is_zero():
    x = t64([[1.0, 2.0], [7.0, 9.0]])
    mask = torch.tensor([[True, True], [False, False]])
    assert_close(masked_mean(x, mask, dim=1), t64([1.5, 0.0]), **F64)


def test_masked_mean_accepts_long_mask():
    assert_close(masked_mean(X, M.long(), dim=-1), t64([1.5, 4.0]), **F64)


# --- moments / mean_var -------------------------------------------------------------------------------------------


def test_moments_hand_values():
    # valid: 1, 2, 4 -> count 3, sum 7, squares 1 + 4 + 16 = 21
    assert_close(moments(X, M), t64([3.0, 7.0, 21.0]), **F64)
    assert moments(X.float(), M).dtype == torch.float64


def test_mean_var_matches_torch_on_valid_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 1
    mask = prefix_mask([7, 3, 1, 5], 7)
    mean, var = mean_var(moments(x, mask))
    assert_close(mean, x[mask].mean(), **F64)
    assert_close(var, x[mask].var(), **F64)  # unbiased
    _, biased = mean_var(moments(x, mask), unbiased=False)
    assert_close(biased, x[mask].var(unbiased=False), **F64)


def test_mean_var_hand_values():
    # 1, 2, 4: mean 7/3; sum of squared deviations = 21 - 49/3 = 14/3; unbiased var = 14/3 / 2 = 7/3
    mean, var = mean_var(moments(X, M))
    assert_close(mean, t64(7.0 / 3.0), **F64)
    assert_close(var, t64(7.0 / 3.0), **F64)


def test_moments_of_shards_sum_to_moments_of_whole():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, generator=g, dtype=torch.float64) + 2
    mask_a = prefix_mask([5, 2, 4], 5)
    mask_b = prefix_mask([1, 3], 5)
    mean, var = mean_var(moments(a, mask_a) + moments(b, mask_b))
    valid = torch.cat([a[mask_a], b[mask_b]])
    assert_close(mean, valid.mean(), **F64)
    assert_close(var, valid.var(), **F64)


# --- whiten -------------------------------------------------------------------------------------------------------


def _random_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2.5 + 3.0
    mask = prefix_mask([6, 4, 2, 5], 6)
    return x, mask


def test_whiten_valid_entries_have_zero_mean_unit_std_and_padding_zero():
    x, mask = _random_batch()
    out = whiten(x, mask)
    assert_close(out[mask].mean(), t64(0.0), atol=1e-6, rtol=0)
    assert_close(out[mask].std(), t64(1.0), atol=1e-5, rtol=0)
    assert torch.all(out[~mask] == 0)


def test_whiten_without_shift_keeps_mean():
    x, mask = _random_batch()
    out = whiten(x, mask, shift_mean=False)
    assert_close(out[mask].mean(), x[mask].mean(), **F64)
    assert_close(out[mask].std(), t64(1.0), atol=1e-5, rtol=0)
    assert torch.all(out[~mask] == 0)


def test_whiten_uses_given_stats():
    big = t64([[1.0, 2.0, 3.0, 4.0, 5.0]])
    stats = moments(big, torch.ones_like(big, dtype=torch.bool))  # mean 3, unbiased var 10 / 4 = 2.5
    x = t64([[5.0, 0.0]])
    mask = torch.tensor([[True, False]])
    out = whiten(x, mask, stats=stats)
    # (5 - 3) / sqrt(2.5) = 1.2649...; a single-entry batch on its own would have var 0
    assert_close(out, t64([[2.0 / math.sqrt(2.5), 0.0]]), **F64)
    out = whiten(x, mask, stats=stats, shift_mean=False)
    assert_close(out, t64([[2.0 / math.sqrt(2.5) + 3.0, 0.0]]), **F64)


# --- KL -----------------------------------------------------------------------------------------------------------


def test_kl_k1_and_k3_hand_values():
    logprobs = t64([math.log(0.5), math.log(0.25)])
    ref = t64([math.log(0.25), math.log(0.5)])
    # k1 = log p - log q: log 2, -log 2
    assert_close(kl_per_token(logprobs, ref, "k1"), t64([math.log(2), -math.log(2)]), **F64)
    assert_close(kl_per_token(logprobs, ref), t64([math.log(2), -math.log(2)]), **F64)  # k1 is the default
    # k3 = (q/p - 1) - log(q/p): q/p = 0.5 -> -0.5 + log 2;  q/p = 2 -> 1 - log 2
    expected = t64([-0.5 + math.log(2), 1.0 - math.log(2)])
    assert_close(kl_per_token(logprobs, ref, "k3"), expected, **F64)


def test_kl_k3_is_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
    b = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
    assert torch.all(kl_per_token(a, b, "k3") >= 0)
    assert torch.all(kl_per_token(a, a, "k3") == 0)


def test_kl_estimators_are_unbiased_for_categorical():
    p = t64([0.1, 0.2, 0.3, 0.4])
    q = t64([0.4, 0.3, 0.2, 0.1])
    exact = (p * (p / q).log()).sum()  # ~0.4564
    g = torch.Generator().manual_seed(4)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[draws], q.log()[draws]
    assert_close(kl_per_token(lp, lq, "k1").mean(), exact, atol=1e-2, rtol=0)
    assert_close(kl_per_token(lp, lq, "k3").mean(), exact, atol=1e-2, rtol=0)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_per_token(t64([0.0]), t64([0.0]), "k2")


def test_fixed_kl_controller_keeps_value():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    ctl.update(0.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_clipped_update_above_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    # error = 9 / 6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)


def test_adaptive_kl_controller_unclipped_update_below_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(5.4, 256)
    # error = 5.4 / 6 - 1 = -0.1 (inside the clip); value = 0.1 * (1 - 0.1 * 256 / 10000) = 0.099744
    assert ctl.value == pytest.approx(0.099744, rel=1e-12)


def test_adaptive_kl_controller_clips_error_from_below():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, 1000)
    # error = -1 -> -0.2; value = 0.1 * (1 - 0.2 * 1000 / 10000) = 0.098
    assert ctl.value == pytest.approx(0.098, rel=1e-12)


def test_adaptive_kl_controller_updates_compound():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    ctl.update(5.4, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99744, rel=1e-12)


def test_adaptive_kl_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    state = ctl.state_dict()
    assert state == {"value": pytest.approx(0.100512), "target": 6.0, "horizon": 10000.0}
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(5.4, 256)
    restored.update(5.4, 256)
    assert restored.value == ctl.value


@pytest.mark.parametrize("kl", [float("nan"), float("inf")])
def test_adaptive_kl_controller_ignores_non_finite_kl(kl):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl, 256)
    assert ctl.value == 0.1


@pytest.mark.parametrize("target, horizon", [(0.0, 10000), (-1.0, 10000), (6.0, 0.0)])
def test_adaptive_kl_controller_rejects_bad_settings(target, horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=target, horizon=horizon)


# --- shaped rewards and GAE -----------------------------------------------------------------------------------------


def test_shaped_rewards_kl_penalty_and_score_on_last_token():
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = prefix_mask([3, 2], 3)
    rewards = shaped_rewards(t64([1.0, 2.0]), kl, mask, kl_coef=0.5)
    # row 0: -0.05, -0.1, -0.15 + 1;  row 1: -0.2, -0.25 + 2, padding 0
    assert_close(rewards, t64([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]), **F64)


def test_shaped_rewards_single_token_row():
    kl = t64([[0.4, 7.0, 7.0]])
    rewards = shaped_rewards(t64([3.0]), kl, prefix_mask([1], 3), kl_coef=0.1)
    assert_close(rewards, t64([[3.0 - 0.04, 0.0, 0.0]]), **F64)


def test_shaped_rewards_empty_row_raises():
    kl = t64([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError):
        shaped_rewards(t64([1.0, 2.0]), kl, prefix_mask([2, 0], 2), kl_coef=0.1)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    rewards = t64([[1.0, 2.0, 3.0, 4.0], [5.0, 9.0, 9.0, 9.0]])
    values = t64([[0.5, -1.0, 2.0, 0.25], [1.5, 9.0, 9.0, 9.0]])
    mask = prefix_mask([4, 1], 4)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = t64([[10.0, 9.0, 7.0, 4.0], [5.0, 0.0, 0.0, 0.0]])
    assert_close(returns, to_go, **F64)
    assert_close(advantages, t64([[9.5, 10.0, 5.0, 3.75], [3.5, 0.0, 0.0, 0.0]]), **F64)


GAE_REWARDS = t64([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
GAE_VALUES = t64([[0.5, 1.0, 1.5], [2.0, 1.0, 0.0]])
GAE_MASK = prefix_mask([3, 2], 3)
# gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); V after the last token is 0.
# row 0: d2 = 2 - 1.5 = 0.5;              A2 = 0.5
#        d1 = 0 + 0.9 * 1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.72 * 0.5 = 0.71
#        d0 = 1 + 0.9 * 1.0 - 0.5 = 1.4;   A0 = 1.4 + 0.72 * 0.71 = 1.9112
# row 1: d1 = 3 - 1.0 = 2.0;              A1 = 2.0
#        d0 = 0 + 0.9 * 1.0 - 2.0 = -1.1;  A0 = -1.1 + 0.72 * 2.0 = 0.34
GAE_ADVANTAGES = t64([[1.9112, 0.71, 0.5], [0.34, 2.0, 0.0]])
GAE_RETURNS = t64([[2.4112, 1.71, 2.0], [2.34, 3.0, 0.0]])  # A + V


def test_gae_hand_computed():
    advantages, returns = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, GAE_ADVANTAGES, **F64)
    assert_close(returns, GAE_RETURNS, **F64)


def test_gae_padding_does_not_leak():
    rewards = GAE_REWARDS.clone()
    values = GAE_VALUES.clone()
    rewards[1, 2] = 1e6
    values[1, 2] = -1e6
    advantages, returns = gae(rewards, values, GAE_MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, GAE_ADVANTAGES, **F64)
    assert_close(returns, GAE_RETURNS, **F64)


def test_gae_padding_does_not_leak_with_long_padding():
    rewards = t64([[1.0, 1e6, -1e6, 1e6], [2.0, 3.0, 1e6, 1e6]])
    values = t64([[0.5, 1e6, 1e6, -1e6], [1.0, 2.0, 1e6, -1e6]])
    mask = prefix_mask([1, 2], 4)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: A0 = 1 - 0.5 = 0.5
    # row 1: d1 = 3 - 2 = 1 = A1;  d0 = 2 + 0.9 * 2 - 1 = 2.8;  A0 = 2.8 + 0.72 * 1 = 3.52
    assert_close(advantages, t64([[0.5, 0.0, 0.0, 0.0], [3.52, 1.0, 0.0, 0.0]]), **F64)
    assert_close(returns, t64([[1.0, 0.0, 0.0, 0.0], [4.52, 3.0, 0.0, 0.0]]), **F64)


# --- log-probs and entropy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, tokens, temperature)
    assert out.dtype == torch.float32
    assert_close(out, expected, **F32)


def test_logprobs_from_logits_hand_value():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    assert_close(logprobs_from_logits(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]), **F32)
    # T = 0.5: logits 0, 2 log 3 -> probs 1/10, 9/10
    assert_close(logprobs_from_logits(logits, torch.tensor([[0]]), 0.5), torch.tensor([[math.log(0.1)]]), **F32)


def test_logprobs_from_logits_upcasts_half_input():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(1, 4, 9, generator=g) * 2).bfloat16()
    tokens = torch.randint(0, 9, (1, 4), generator=g)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    assert_close(out, expected, **F32)


def test_entropy_of_uniform_is_log_v():
    logits = torch.full((2, 3, 4), 1.7)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(4)), **F32)
    assert_close(entropy_from_logits(logits, temperature=0.3), torch.full((2, 3), math.log(4)), **F32)


def test_entropy_hand_value():
    # probs 1/4, 3/4: H = -(0.25 log 0.25 + 0.75 log 0.75) = 0.562335...
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(logits), torch.tensor([[expected]]), **F32)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_entropy_matches_direct_computation(temperature):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 3, 13, generator=g) * 3
    p = torch.softmax(logits.double() / temperature, -1)
    expected = -(p * p.log()).sum(-1)
    out = entropy_from_logits(logits, temperature)
    assert out.dtype == torch.float32
    assert_close(out, expected.float(), **F32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("positions_per_chunk", [1, 7, 1000])
def test_chunked_token_logprobs_equal_the_straightforward_path(temperature, positions_per_chunk):
    """The fused, chunked log-prob + entropy (and its hand-written backward) against autograd through
    `logprobs_from_logits` and `entropy_from_logits`, on the sliced view the policy pass uses: values and gradients
    within 1e-6 in float32."""
    from rlhf.ppo.losses import token_logprobs

    g = torch.Generator().manual_seed(9)
    full = (torch.randn(5, 8, 300, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, 300, (5, 7), generator=g)
    weights = torch.randn(5, 7, generator=g)
    fused, entropy = token_logprobs(full[:, :-1], tokens, temperature, with_entropy=True,
                                    positions_per_chunk=positions_per_chunk)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), full)
    plain = logprobs_from_logits(full[:, :-1], tokens, temperature)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), full)
    assert fused.dtype == entropy.dtype == torch.float32
    assert_close(fused, plain, atol=1e-6, rtol=0)
    # lse - sum p*l cancels in float32 where the distribution is peaked.
    assert_close(entropy, entropy_from_logits(full[:, :-1].detach(), temperature), atol=2e-5, rtol=1e-5)
    assert_close(fused_grad, plain_grad, atol=1e-6, rtol=0)
    # The entropy carries its gradient (the entropy bonus), alone and together with the log-probs'.
    entropy_weights = torch.randn(5, 7, generator=g)
    fused, entropy = token_logprobs(full[:, :-1], tokens, temperature, with_entropy=True,
                                    positions_per_chunk=positions_per_chunk)
    plain = logprobs_from_logits(full[:, :-1], tokens, temperature)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum() + (entropy * entropy_weights).sum(), full)
    exact = full.detach().double().requires_grad_()  # float64: the entropy's gradient cancels in float32
    plain = logprobs_from_logits(exact[:, :-1], tokens, temperature)
    plain_entropy = entropy_from_logits(exact[:, :-1], temperature)
    (plain_grad,) = torch.autograd.grad((plain * weights.double()).sum()
                                        + (plain_entropy * entropy_weights.double()).sum(), exact)
    assert_close(fused_grad.double(), plain_grad, atol=5e-6, rtol=0)
    assert fused_grad[:, -1].abs().max() == 0  # the position sliced off gets no gradient
    assert token_logprobs(full[:, :-1], tokens, temperature)[1] is None


def test_the_entropy_bonus_changes_the_gradient_by_the_hand_computed_amount():
    """ppo.entropy_coef: the loss pg + vf_coef * vf + c * entropy_bonus has the gradient of pg + vf_coef * vf plus
    -c/n * dH/dl per position, with dH/dl_j = p_j (sum_k p_k l_k - l_j) / T for l = logits / T (written out here,
    not through autograd)."""
    from rlhf.ppo.losses import entropy_bonus, token_logprobs

    temperature, coef = 0.7, 0.3
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 2).float().requires_grad_()
    tokens = torch.randint(0, 6, (2, 3), generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old_logprobs = torch.randn(2, 3, generator=g) * 0.1 - 2
    advantages = torch.randn(2, 3, generator=g)

    def loss_and_grad(entropy_coef):
        logprobs, entropy = token_logprobs(logits[:, :-1], tokens, temperature, with_entropy=True)
        pg, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
        loss = pg
        if entropy_coef:
            bonus, stats = entropy_bonus(entropy, mask)
            assert_close(stats["entropy"], (entropy * mask).sum() / mask.sum())
            loss = loss + entropy_coef * bonus
        return torch.autograd.grad(loss, logits)[0]

    with_bonus, without = loss_and_grad(coef), loss_and_grad(0.0)
    scaled = logits.detach()[:, :-1].double() / temperature
    p = torch.softmax(scaled, -1)
    dh = p * ((p * scaled).sum(-1, keepdim=True) - scaled) / temperature
    expected = torch.zeros(2, 4, 6, dtype=torch.float64)
    expected[:, :-1] = -coef * dh * mask.unsqueeze(-1) / mask.sum()
    assert expected.abs().max() > 1e-2
    assert_close((with_bonus - without).double(), expected, atol=1e-6, rtol=0)


def test_chunked_token_logprobs_keep_the_input_dtype_for_the_gradient():
    from rlhf.ppo.losses import token_logprobs

    logits = torch.randn(2, 3, 11).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 11, (2, 3))
    out, _ = token_logprobs(logits, tokens)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    (reference,) = torch.autograd.grad(logprobs_from_logits(logits, tokens).sum(), logits)
    assert_close(grad.float(), reference.float(), atol=1e-2, rtol=0)


def test_entropy_chunking_does_not_change_result():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(37, 2, 7, generator=g) * 2
    whole = entropy_from_logits(logits, 0.9)
    assert whole.shape == (37, 2)
    assert_close(entropy_from_logits(logits, 0.9, chunk=1), whole, atol=0, rtol=0)
    assert_close(entropy_from_logits(logits, 0.9, chunk=5), whole, atol=0, rtol=0)


# --- policy loss ----------------------------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(9)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    advantages = torch.randn(3, 5, generator=g, dtype=torch.float64)
    advantages_padded = advantages.clone()
    mask = prefix_mask([5, 2, 3], 5)
    advantages_padded[~mask] = 1e6
    loss, stats = policy_loss(old.clone(), old, advantages_padded, mask, clip_range=0.2)
    assert_close(loss, -advantages[mask].mean(), **F64)
    assert_close(stats["clipfrac"], t64(0.0), **STAT)
    assert_close(stats["approx_kl"], t64(0.0), **STAT)
    assert_close(stats["ratio"], t64(1.0), **STAT)


def _ratio_one_and_a_half_batch():
    old = t64([[-1.0, -2.0, -3.0]])
    logprobs = (old + math.log(1.5)).requires_grad_()
    advantages = t64([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    return logprobs, old, advantages, mask


def test_policy_loss_hand_clipped_and_unclipped():
    logprobs, old, advantages, mask = _ratio_one_and_a_half_batch()
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token 0, A = +1: max(-1.5, -1.2) = -1.2 (clipped);  token 1, A = -1: max(1.5, 1.2) = 1.5 (unclipped)
    assert_close(loss, t64((-1.2 + 1.5) / 2), **F64)
    assert_close(stats["clipfrac"], t64(0.5), **STAT)
    assert_close(stats["ratio"], t64(1.5), **STAT)


def test_policy_loss_gradient_is_zero_where_clipped():
    logprobs, old, advantages, mask = _ratio_one_and_a_half_batch()
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    # token 0 clipped: 0.  token 1: d/dlogp (r / 2) = r / 2 = 0.75.  token 2 padding: 0.
    assert_close(logprobs.grad, t64([[0.0, 0.75, 0.0]]), atol=0, rtol=1e-12)
    assert logprobs.grad[0, 0] == 0.0


def test_policy_loss_inside_clip_range_has_gradient():
    old = t64([[0.0]])
    logprobs = t64([[math.log(1.1)]]).requires_grad_()
    loss, stats = policy_loss(logprobs, old, t64([[2.0]]), torch.tensor([[True]]), clip_range=0.2)
    loss.backward()
    # loss = -A r = -2.2; d/dlogp = -A r = -2.2
    assert_close(loss, t64(-2.2), **F64)
    assert_close(logprobs.grad, t64([[-2.2]]), **F64)
    assert_close(stats["clipfrac"], t64(0.0), **STAT)


def test_policy_loss_below_clip_range():
    old = t64([[0.0, 0.0]])
    logprobs = t64([[math.log(0.5), math.log(0.5)]]).requires_grad_()
    loss, stats = policy_loss(logprobs, old, t64([[-1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), clip_range=0.2)
    loss.backward()
    # A = -1: max(0.5, 0.8) = 0.8 clipped, no gradient;  A = +1: max(-0.5, -0.8) = -0.5 unclipped, grad -r/2 = -0.25
    assert_close(loss, t64((0.8 - 0.5) / 2), **F64)
    assert_close(stats["clipfrac"], t64(0.5), **STAT)
    assert_close(logprobs.grad, t64([[0.0, -0.25]]), atol=0, rtol=1e-12)


def test_policy_loss_shards_sum_to_global():
    g = torch.Generator().manual_seed(10)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64)
    new = old + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    advantages = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = prefix_mask([6, 1, 4, 3], 6)
    total = int(mask.sum())
    loss, stats = policy_loss(new, old, advantages, mask, clip_range=0.2)
    assert stats["clipfrac"] > 0  # the clip is exercised
    parts = [policy_loss(new[s], old[s], advantages[s], mask[s], clip_range=0.2, num_tokens=total)
             for s in (slice(0, 1), slice(1, 4))]
    assert_close(parts[0][0] + parts[1][0], loss, **F64)
    for key in ("clipfrac", "approx_kl", "ratio"):
        assert_close(parts[0][1][key] + parts[1][1][key], stats[key], **STAT)
    # num_tokens given as a tensor works the same
    tensor_loss, _ = policy_loss(new, old, advantages, mask, clip_range=0.2, num_tokens=torch.tensor(total))
    assert_close(tensor_loss, loss, **F64)


def test_policy_loss_stats_are_detached():
    old = t64([[0.0, -1.0]])
    logprobs = t64([[0.3, -0.5]]).requires_grad_()
    loss, stats = policy_loss(logprobs, old, t64([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool), clip_range=0.2)
    assert loss.requires_grad
    assert all(not v.requires_grad for v in stats.values())


# --- value loss -----------------------------------------------------------------------------------------------------


def test_value_loss_hand_clipped():
    values = t64([[1.0]]).requires_grad_()
    loss, stats = value_loss(values, t64([[0.0]]), t64([[2.0]]), torch.tensor([[True]]), clip_range=0.2)
    # unclipped (1 - 2)^2 = 1; clipped value 0 + 0.2 -> (0.2 - 2)^2 = 3.24; loss = 0.5 * 3.24
    assert_close(loss, t64(1.62), **F64)
    assert_close(stats["clipfrac"], t64(1.0), **STAT)
    loss.backward()
    assert values.grad.item() == 0.0
    assert not stats["clipfrac"].requires_grad


def test_value_loss_hand_mixed_and_gradients():
    values = t64([[1.0, 0.5, 0.1, 42.0]]).requires_grad_()
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    returns = t64([[2.0, -1.0, 1.0, -42.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: clipped wins, 3.24 (vs 1)
    # token 1: moved beyond the clip range but away from the return: unclipped (1.5)^2 = 2.25 > clipped (1.2)^2 = 1.44
    # token 2: inside the range, both (0.9)^2 = 0.81
    # loss = 0.5 * (3.24 + 2.25 + 0.81) / 3 = 1.05
    assert_close(loss, t64(1.05), **F64)
    assert_close(stats["clipfrac"], t64(1.0 / 3.0), **STAT)
    loss.backward()
    # d/dV 0.5 (V - R)^2 / 3 = (V - R) / 3: token 1: 1.5 / 3 = 0.5; token 2: -0.9 / 3 = -0.3
    assert_close(values.grad, t64([[0.0, 0.5, -0.3, 0.0]]), **F64)


def test_value_loss_num_tokens_normalisation():
    values = t64([[1.0, 0.5]])
    loss, stats = value_loss(values, t64([[0.0, 0.0]]), t64([[2.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool),
                             clip_range=0.2, num_tokens=10)
    assert_close(loss, t64(0.5 * (3.24 + 2.25) / 10), **F64)
    assert_close(stats["clipfrac"], t64(0.1), **STAT)


# --- explained variance ---------------------------------------------------------------------------------------------


def test_explained_variance_perfect_values_is_one():
    returns = t64([[1.0, 2.0, 4.0], [0.5, 9.0, 9.0]])
    mask = prefix_mask([3, 1], 3)
    values = returns.clone()
    values[1, 1:] = -100.0  # padding ignored
    assert_close(explained_variance(values, returns, mask), torch.tensor(1.0), **F32)


def test_explained_variance_constant_mean_is_zero():
    returns = t64([[1.0, 2.0, 4.0], [0.5, 9.0, 9.0]])
    mask = prefix_mask([3, 1], 3)
    values = torch.full_like(returns, float(returns[mask].mean()))
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_explained_variance_hand_value():
    returns = t64([[1.0, 2.0, 3.0]])
    values = t64([[1.0, 1.0, 1.0]])
    # Var[R] = 1; R - V = 0, 1, 2 -> Var = 1; EV = 0.  With V = 0, 2, 3: R - V = 1, 0, 0, Var = 1/3; EV = 2/3
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(explained_variance(t64([[0.0, 2.0, 3.0]]), returns, mask), torch.tensor(2.0 / 3.0), **F32)


def test_explained_variance_nan_when_returns_constant():
    returns = t64([[2.0, 2.0, 2.0]])
    ev = explained_variance(t64([[0.0, 1.0, 5.0]]), returns, torch.ones(1, 3, dtype=torch.bool))
    assert torch.isnan(ev)


def test_explained_variance_nan_when_returns_constant_not_exactly_representable():
    returns = torch.full((2, 5), 1.0 / 3.0, dtype=torch.float64)
    ev = explained_variance(torch.zeros_like(returns), returns, torch.ones(2, 5, dtype=torch.bool))
    assert torch.isnan(ev)


def test_policy_loss_approx_kl_is_k3_of_kl_old_new():
    # samples come from the old policy; r = new / old = 1.5 -> k3 = (1.5 - 1) - log 1.5 = 0.0945
    _, stats = policy_loss(t64([[math.log(1.5)]]), t64([[0.0]]), t64([[1.0]]), torch.tensor([[True]]),
                           clip_range=0.2)
    assert_close(stats["approx_kl"], t64(0.5 - math.log(1.5)), **STAT)


def test_shaped_rewards_refuse_a_mask_that_is_not_right_padded():
    """The score lands at index count - 1 of each row: right only when a row's valid tokens come first."""
    kl = torch.zeros(2, 4)
    right = torch.tensor([[True, True, True, False], [True, False, False, False]])
    torch.testing.assert_close(shaped_rewards(torch.tensor([1.0, 2.0]), kl, right, 0.1),
                               torch.tensor([[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    left = torch.tensor([[True, True, True, False], [False, False, True, True]])
    with pytest.raises(ValueError, match="response_mask must be right-padded"):
        shaped_rewards(torch.tensor([1.0, 2.0]), kl, left, 0.1)

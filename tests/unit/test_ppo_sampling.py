from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.rollout import left_pad, position_ids, truncate_after_stop
from rlhf.ppo.sampling import filter_logits, sample_from_logits, sample_seed, sample_uniforms

NEG_INF = float("-inf")
# 0.999 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)); df = 2 is -2 ln(0.001).
CHI2_999_DF2 = 13.816
CHI2_999_DF7 = 24.322


# --- per-sample streams ---------------------------------------------------------------------------------------------


def test_sample_seed_is_deterministic_and_63_bit():
    assert sample_seed(0, "rollout", 5) == sample_seed(0, "rollout", 5)
    seeds = [sample_seed(s, stream, i) for s in (0, 1) for stream in ("rollout", "eval") for i in range(50)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_sample_seed_differs_by_seed_stream_and_index():
    base = sample_seed(0, "rollout", 5)
    assert sample_seed(1, "rollout", 5) != base
    assert sample_seed(0, "eval", 5) != base
    assert sample_seed(0, "rollout", 6) != base


def test_sample_uniforms_row_depends_only_on_its_index():
    both = sample_uniforms(0, "rollout", [3, 7], 16)
    alone = sample_uniforms(0, "rollout", [7], 16)
    reversed_ = sample_uniforms(0, "rollout", [7, 3, 11], 16)
    assert both.shape == (2, 16) and both.dtype == torch.float64
    assert torch.equal(both[1], alone[0])
    assert torch.equal(both[0], reversed_[1])
    assert torch.equal(both[1], reversed_[0])
    assert not torch.equal(both[0], both[1])


def test_sample_uniforms_prefix_of_longer_stream():
    short = sample_uniforms(4, "eval", [2], 5)
    long = sample_uniforms(4, "eval", [2], 40)
    assert torch.equal(short[0], long[0, :5])


def test_sample_uniforms_differ_by_stream_and_seed():
    base = sample_uniforms(0, "rollout", [1], 8)
    assert not torch.equal(base, sample_uniforms(0, "eval", [1], 8))
    assert not torch.equal(base, sample_uniforms(1, "rollout", [1], 8))


def test_sample_uniforms_in_unit_interval():
    u = sample_uniforms(0, "rollout", list(range(64)), 256)
    assert torch.all(u >= 0) and torch.all(u < 1)
    assert 0.45 < float(u.mean()) < 0.55


# --- filtering ------------------------------------------------------------------------------------------------------


def test_filter_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    expected = torch.tensor([[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF], [5.0, 4.0, NEG_INF, NEG_INF, NEG_INF]])
    assert torch.equal(out, expected)


def test_filter_top_k_zero_or_vocab_size_keeps_all():
    logits = torch.tensor([[0.1, 3.0, -1.0]])
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=3), logits)
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_filter_top_p_half_keeps_only_first():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    out = filter_logits(logits, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False]]
    assert out[0, 0] == logits[0, 0]


def test_filter_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True]]


def test_filter_top_p_works_on_unsorted_rows():
    # probs 0.2, 0.5, 0.3 and 0.3, 0.2, 0.5: top_p = 0.7 keeps 0.5 and 0.3
    logits = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.2, 0.5]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, True], [True, False, True]]


def test_filter_always_keeps_top_token():
    logits = torch.tensor([[0.0, 9.0, 1.0], [4.0, 4.5, 3.0]])
    out = filter_logits(logits, top_p=1e-6)
    assert torch.isfinite(out).tolist() == [[False, True, False], [False, True, False]]
    out = filter_logits(logits, top_k=1, top_p=1e-6)
    assert torch.isfinite(out).tolist() == [[False, True, False], [False, True, False]]


def test_filter_top_k_then_top_p_uses_renormalised_probs():
    # top_k = 2 keeps probs 0.4, 0.3 (renormalised 4/7, 3/7); top_p = 0.5 then keeps only the first
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = filter_logits(logits, top_k=2, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    # without top_k, 0.4 < 0.5 so the second token is needed as well
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, True, False, False]]


# --- sampling -------------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    uniforms = torch.tensor([0.0, 0.999, 0.5], dtype=torch.float64)
    assert sample_from_logits(logits, uniforms, temperature=0).tolist() == [1, 0, 2]


def test_inverse_cdf_hand_case():
    # probs 0.2, 0.3, 0.5 -> cdf 0.2, 0.5, 1.0
    logits = torch.tensor([[0.2, 0.3, 0.5]]).log().expand(3, 3)
    uniforms = torch.tensor([0.1, 0.25, 0.9], dtype=torch.float64)
    assert sample_from_logits(logits, uniforms).tolist() == [0, 1, 2]


def test_inverse_cdf_hand_case_with_temperature():
    # logits 0, log 3 at T = 0.5 -> 0, 2 log 3 -> probs 0.1, 0.9
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(3, 2)
    uniforms = torch.tensor([0.05, 0.15, 0.7], dtype=torch.float64)
    assert sample_from_logits(logits, uniforms, temperature=0.5).tolist() == [0, 1, 1]
    # at T = 1 the probs are 0.25, 0.75, so u = 0.15 picks token 0
    assert sample_from_logits(logits, uniforms).tolist() == [0, 0, 1]


def _grid(n):
    # 0, the smallest positive and a value near 1, and an even grid over [0, 1)
    return torch.cat([torch.tensor([0.0, 1e-12, 1 - 1e-12], dtype=torch.float64),
                      torch.linspace(0, 1, n + 1, dtype=torch.float64)[:-1]])


def test_zero_probability_token_never_chosen():
    logits = torch.tensor([[NEG_INF, 1.0, NEG_INF, 2.0, 0.5]])
    grid = _grid(2000)
    tokens = sample_from_logits(logits.expand(len(grid), 5), grid)
    assert set(tokens.tolist()) == {1, 3, 4}
    assert tokens[0] == 1  # u = 0 -> first token with mass
    assert tokens[2] == 4  # u -> 1 -> last token with mass


def test_filtered_token_never_chosen():
    logits = torch.tensor([[1.0, 0.0, 3.0, 2.0, 4.0]])
    grid = _grid(1000)
    tokens = sample_from_logits(logits.expand(len(grid), 5), grid, top_k=2)
    assert set(tokens.tolist()) == {2, 4}
    tokens = sample_from_logits(logits.expand(len(grid), 5), grid, top_p=0.5)  # probs ~0.64, 0.24, ...
    assert set(tokens.tolist()) == {4}


# u just below 1 picks the last token that has probability, never one after it.
@pytest.mark.parametrize("logits, top_k, expected", [([1.0, 2.0, NEG_INF], 0, 1), ([1.0, 4.0, 3.0, 2.0, 0.0], 2, 2)])
def test_zero_probability_last_token_never_chosen(logits, top_k, expected):
    logits = torch.tensor([logits])
    uniforms = torch.tensor([1 - 1e-12], dtype=torch.float64)
    assert sample_from_logits(logits, uniforms, top_k=top_k).tolist() == [expected]


def test_sampling_is_deterministic_given_uniforms_and_rowwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g) * 2
    uniforms = torch.rand(6, generator=g, dtype=torch.float64)
    first = sample_from_logits(logits, uniforms, temperature=0.7, top_k=5, top_p=0.9)
    second = sample_from_logits(logits.clone(), uniforms.clone(), temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(first, second)
    rows = torch.cat([sample_from_logits(logits[i:i + 1], uniforms[i:i + 1], temperature=0.7, top_k=5, top_p=0.9)
                      for i in range(6)])
    assert torch.equal(first, rows)


CHI_LOGITS = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5, -2.0])


def _draw(n, **kwargs):
    g = torch.Generator().manual_seed(1234)
    uniforms = torch.rand(n, generator=g, dtype=torch.float64)
    tokens = sample_from_logits(CHI_LOGITS.expand(n, len(CHI_LOGITS)), uniforms, **kwargs)
    return torch.bincount(tokens, minlength=len(CHI_LOGITS)).double()


def _chi_square(counts, probs):
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampler_matches_softmax_chi_square():
    n = 20_000
    counts = _draw(n, temperature=0.8, top_k=0, top_p=1.0)
    probs = torch.softmax(CHI_LOGITS.double() / 0.8, -1)
    assert _chi_square(counts, probs) < CHI2_999_DF7
    # the test has power: the same draws are far from the T = 1 distribution
    assert _chi_square(counts, torch.softmax(CHI_LOGITS.double(), -1)) > CHI2_999_DF7


def test_sampler_matches_renormalised_top_k_chi_square():
    n = 20_000
    counts = _draw(n, temperature=0.8, top_k=3, top_p=1.0)
    top = [3, 6, 0]  # logits 2.0, 1.5, 1.0
    outside = [i for i in range(len(CHI_LOGITS)) if i not in top]
    assert counts[outside].sum() == 0
    probs = torch.softmax(CHI_LOGITS[top].double() / 0.8, -1)
    assert _chi_square(counts[top], probs) < CHI2_999_DF2
    # unrenormalised probabilities would not fit
    unrenormalised = torch.softmax(CHI_LOGITS.double() / 0.8, -1)[top]
    expected = n * unrenormalised
    assert float(((counts[top] - expected) ** 2 / expected).sum()) > CHI2_999_DF2


# --- rollout helpers ------------------------------------------------------------------------------------------------


def test_truncate_after_stop_single_stop_id():
    tokens = torch.tensor([[5, 2, 7, 2, 9], [5, 6, 7, 8, 9], [2, 1, 1, 1, 1], [1, 1, 1, 1, 2]])
    mask, stopped = truncate_after_stop(tokens, [2])
    assert mask.dtype == torch.bool and stopped.dtype == torch.bool
    assert mask.tolist() == [
        [True, True, False, False, False],  # first stop included, the rest (and the second stop) excluded
        [True, True, True, True, True],  # no stop: all of the row
        [True, False, False, False, False],
        [True, True, True, True, True],  # stop in the last position
    ]
    assert stopped.tolist() == [True, False, True, True]


def test_truncate_after_stop_multiple_stop_ids():
    tokens = torch.tensor([[5, 8, 2, 7], [5, 6, 2, 8], [1, 3, 4, 5]])
    mask, stopped = truncate_after_stop(tokens, [2, 8])
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]
    assert stopped.tolist() == [True, True, False]
    mask, stopped = truncate_after_stop(tokens, (8,))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, True, True, True]]
    assert stopped.tolist() == [True, True, False]


def test_left_pad_right_aligns():
    ids, mask = left_pad([[1, 2, 3], [4], [5, 6]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_left_pad_uses_pad_id_and_handles_empty():
    ids, mask = left_pad([[7, 8], []], pad_token_id=99)
    assert ids.tolist() == [[7, 8], [99, 99]]
    assert mask.tolist() == [[1, 1], [0, 0]]


def test_position_ids_start_at_zero_on_first_real_token():
    _, mask = left_pad([[1, 2, 3, 4], [5, 6], [7]], pad_token_id=0)
    assert position_ids(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 0]]
    # a response appended after the prompt continues the count
    full = torch.cat([mask, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])], dim=1)
    assert position_ids(full).tolist() == [
        [0, 1, 2, 3, 4, 5, 5],
        [0, 0, 0, 1, 2, 2, 2],
        [0, 0, 0, 0, 1, 2, 3],
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_logprobs_match_a_policy_pass_and_give_the_same_loss_and_gradients(temperature):
    """The rollout's log-probs read off generation's logits (KV cache, one position at a time) against the full
    forward pass the rollout would otherwise make: equal to float32 rounding, and the PPO loss and its gradients
    built on either agree within 1e-6."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.ppo.losses import policy_loss
    from rlhf.ppo.rollout import GenerationSettings, generate, policy_forward

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    settings = GenerationSettings(max_new_tokens=12, temperature=temperature, top_k=8, top_p=1.0,
                                  stop_token_ids=(3,), pad_token_id=0)
    rollout = generate(model, prompts, sample_uniforms(0, "rollout", [0, 1, 2], 12), settings, "cpu")
    r, mask = rollout.response_ids.shape[1], rollout.response_mask.clone()
    input_ids, attention_mask, generated = (t.clone() for t in (rollout.input_ids, rollout.attention_mask,
                                                                rollout.logprobs))  # out of inference mode
    with torch.no_grad():
        forward, _ = policy_forward(model, input_ids, attention_mask, r, temperature=temperature)
    assert generated.dtype == torch.float32 and generated.shape == forward.shape
    assert (generated[~mask] == 0).all()
    assert torch.allclose(generated[mask], forward[mask], atol=1e-5, rtol=0)

    advantages = torch.randn(mask.shape)
    results = []
    for old in (generated, forward):
        model.zero_grad()
        new, _ = policy_forward(model, input_ids, attention_mask, r, temperature=temperature)
        loss, _ = policy_loss(new, old, advantages, mask, clip_range=0.2, num_tokens=mask.sum())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads_a, grads_b))


def test_without_stop_tokens_every_response_has_max_new_tokens():
    """``rollout.stop_at_stop_token=false`` (the throughput workload): no row ends early, even one that samples EOS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.ppo.rollout import GenerationSettings, generate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    prompts = [[5, 6], [7]] * 4
    uniforms = sample_uniforms(0, "rollout", list(range(8)), 20)
    stopping = generate(model, prompts, uniforms, GenerationSettings(20, 1.0, 0, 1.0, (3,), 0), "cpu")
    assert stopping.stopped.any()  # with 8 tokens, token 3 comes up in 20 draws
    free = generate(model, prompts, uniforms, GenerationSettings(20, 1.0, 0, 1.0, (), 0), "cpu")
    assert free.response_ids.shape == (8, 20) and free.response_mask.all() and not free.stopped.any()
    assert (free.response_ids == 3).any()

"""The PPO speed-ups that must not change what is computed: each against the straightforward path on the same tokens
(fp32: values within float32 rounding, losses and gradients within 1e-6)."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo.sampling import inverse_cdf, sample_uniforms, sample_with_logprobs


def _gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(**(config | overrides)))


def _batch(seed: int = 1, rows: int = 4, length: int = 20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    mask[3, :2] = 0
    return ids, mask


# --- fused GELU -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast"])
def test_fused_activations_give_the_same_loss_and_gradients(activation):
    from transformers.activations import GELUTanh

    from rlhf.models import fuse_activations
    from rlhf.ppo.rollout import policy_forward

    plain, fused = _gpt2(activation_function=activation), _gpt2(activation_function=activation)
    assert fuse_activations(fused) == 2  # one per block
    assert all(type(block.mlp.act) is GELUTanh for block in fused.transformer.h)
    assert fuse_activations(fused) == 0
    ids, mask = _batch()
    results = []
    for model in (plain, fused):
        logprobs, entropy = policy_forward(model, ids, mask, 8, temperature=0.7, with_entropy=True)
        loss = -(logprobs * torch.linspace(-1, 1, 8)).sum() / logprobs.numel()
        loss.backward()
        results.append((logprobs.detach(), entropy, loss.detach(), [p.grad for p in model.parameters()]))
    (lp_a, ent_a, loss_a, grads_a), (lp_b, ent_b, loss_b, grads_b) = results
    assert torch.allclose(lp_a, lp_b, atol=1e-6, rtol=0) and torch.allclose(ent_a, ent_b, atol=1e-6, rtol=0)
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads_a, grads_b))
    # What is saved does not change: same weights, same config.
    assert fused.config.activation_function == activation
    assert plain.state_dict().keys() == fused.state_dict().keys()


def test_loader_fuses_activations_unless_switched_off(tmp_path):
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    _gpt2().save_pretrained(tmp_path)
    on = load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))
    off = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), fused_activations=False))
    assert type(on.transformer.h[0].mlp.act) is GELUTanh
    assert type(off.transformer.h[0].mlp.act) is NewGELUActivation


# --- reserved KV cache ----------------------------------------------------------------------------------------------


def test_reserved_cache_layers_return_what_a_growing_cache_returns():
    from transformers.cache_utils import Cache, DynamicCache

    from rlhf.ppo.rollout import reserved_layer_class

    g = torch.Generator().manual_seed(0)
    grown, reserved = DynamicCache(), Cache(layers=[reserved_layer_class()(capacity=7)])
    first = [torch.randn(3, 2, 5, 4, generator=g) for _ in range(2)]
    for keys, values in zip(grown.update(*first, layer_idx=0), reserved.update(*first, layer_idx=0)):
        assert torch.equal(keys, values)
    layer = reserved.layers[0]
    assert layer.key_buffer.shape[-2] == 7 and layer.filled == 5, "the prompt's update did not reserve"
    for step in range(6):  # past the capacity of 7: the buffers grow
        new = [torch.randn(3, 2, 1, 4, generator=g) for _ in range(2)]
        keys_a, values_a = grown.update(*new, layer_idx=0)
        keys_b, values_b = reserved.update(*new, layer_idx=0)
        assert torch.equal(keys_a, keys_b) and torch.equal(values_a, values_b)
        assert reserved.get_seq_length() == grown.get_seq_length() == 6 + step
        # What the model reads back between updates is the layer's keys/values, as in a DynamicLayer.
        assert torch.equal(layer.keys, grown.layers[0].keys) and torch.equal(layer.values, grown.layers[0].values)
        assert layer.keys.data_ptr() == layer.key_buffer.data_ptr(), "the keys are no longer a view of the buffer"
    rows = torch.tensor([2, 0])
    grown.batch_select_indices(rows)
    reserved.batch_select_indices(rows)
    assert torch.equal(layer.keys, grown.layers[0].keys) and torch.equal(layer.values, grown.layers[0].values)


def test_only_growing_full_attention_models_get_a_reserved_cache():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhf.ppo.rollout import can_drop_rows, reserved_cache, reserved_layer_class

    cache = reserved_cache(_gpt2(), capacity=12)
    assert [type(layer) for layer in cache.layers] == [reserved_layer_class()] * 2
    assert can_drop_rows(cache)
    small = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    assert len(reserved_cache(Qwen2ForCausalLM(Qwen2Config(**small)), capacity=12).layers) == 2
    # Sliding-window layers (all of them, or some) keep transformers' own cache.
    assert reserved_cache(MistralForCausalLM(MistralConfig(**small, sliding_window=4)), capacity=12) is None
    mixed = Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert reserved_cache(Qwen2ForCausalLM(mixed), capacity=12) is None


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 8)])
def test_generation_with_a_reserved_cache_samples_the_same_tokens(monkeypatch, temperature, top_k):
    from rlhf.ppo import rollout as rollout_module
    from rlhf.ppo.rollout import GenerationSettings, generate

    model = _gpt2().eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    settings = GenerationSettings(max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=1.0,
                                  stop_token_ids=(3,), pad_token_id=0)
    uniforms = sample_uniforms(0, "rollout", range(4), 16)
    caches = []
    real = rollout_module.reserved_cache
    monkeypatch.setattr(rollout_module, "reserved_cache", lambda model, n: caches.append(real(model, n)) or caches[-1])
    fast = generate(model, prompts, uniforms, settings, "cpu")
    monkeypatch.setattr(rollout_module, "reserved_cache", lambda model, n: None)
    plain = generate(model, prompts, uniforms, settings, "cpu")
    assert len(caches) == 1
    # Both layers reserved: the model wrote into the cache it was given, through the buffers.
    assert [layer.key_buffer is not None for layer in caches[0].layers] == [True, True], (
        f"the model did not fill the cache passed to it as `{rollout_module.cache_argument()}`")
    assert caches[0].get_seq_length() == 4 + fast.response_ids.shape[1] - 1
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-6, rtol=0)


def test_dropping_finished_rows_keeps_every_rows_tokens_and_logprobs(monkeypatch):
    from rlhf.ppo import rollout as rollout_module
    from rlhf.ppo.rollout import GenerationSettings, generate

    model = _gpt2(vocab_size=12).eval()  # a small vocabulary: the stop token (3) comes up every few steps
    prompts = [[5, 6, 7], [8], [9, 10], [11, 4, 5, 6]] * 4
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(3,),
                                  pad_token_id=0)
    uniforms = sample_uniforms(0, "rollout", range(16), 24)
    running = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: running.append(kw["input_ids"].shape[0]) or real_forward(**kw))
    fast = generate(model, prompts, uniforms, settings, "cpu")
    calls_fast, running[:] = list(running), []
    monkeypatch.setattr(rollout_module, "can_drop_rows", lambda cache: False)
    plain = generate(model, prompts, uniforms, settings, "cpu")
    lengths = fast.response_mask.sum(-1)
    assert lengths.min() < lengths.max() == fast.response_ids.shape[1]  # mixed lengths, one runs to the end
    assert calls_fast[-1] < 16 and set(running) == {16}  # rows left the batch; without dropping they never do
    assert sum(calls_fast) < sum(running)
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask) and torch.equal(fast.stopped, plain.stopped)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-6, rtol=0)


# --- sampler and its log-probs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.3, 5, 1.0), (0.8, 0, 0.7),
                                                       (0.0, 0, 1.0)])
def test_sampled_logprobs_are_the_untruncated_log_softmax_at_the_temperature(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 50, generator=g) * 3
    uniforms = torch.rand(32, generator=g, dtype=torch.float64)
    tokens, logprobs = sample_with_logprobs(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p)
    expected = torch.log_softmax(logits / (temperature or 1.0), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    assert logprobs.dtype == torch.float32
    assert torch.allclose(logprobs, expected, atol=1e-6, rtol=0)
    if temperature == 0:
        assert torch.equal(tokens, logits.argmax(-1))


def test_inverse_cdf_never_picks_a_zero_probability_entry_even_past_the_end():
    probs = torch.tensor([[0.25, 0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float32)
    largest_below_one = 1 - 2.0**-53
    assert inverse_cdf(probs, torch.full((2,), largest_below_one, dtype=torch.float64)).tolist() == [2, 2]
    assert inverse_cdf(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [0, 2]
    # u = 1 (outside [0, 1)) puts the target at the total: the guard picks the last entry with probability.
    assert inverse_cdf(probs, torch.ones(2, dtype=torch.float64)).tolist() == [2, 2]
    # Unnormalised rows are sampled in proportion.
    assert inverse_cdf(torch.tensor([[2.0, 6.0]]), torch.tensor([0.24], dtype=torch.float64)).tolist() == [0]
    assert inverse_cdf(torch.tensor([[2.0, 6.0]]), torch.tensor([0.26], dtype=torch.float64)).tolist() == [1]


# --- fused AdamW ----------------------------------------------------------------------------------------------------


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop():
    from rlhf.config import PPOConfig, load_config
    from stages.ppo import PolicyAndCritic, optimiser_and_schedule

    cfg = load_config(PPOConfig, None, ["optim.weight_decay=0.01", "ppo.critic_learning_rate=3e-4"])
    models, optimisers = [], []
    for fused in (False, True):
        model = PolicyAndCritic(_gpt2(), _gpt2(seed=1))
        optimiser, _ = optimiser_and_schedule(cfg, model, total_steps=10, fused=fused)
        assert optimiser.param_groups[0].get("fused") is (True if fused else None)
        models.append(model)
        optimisers.append(optimiser)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model, optimiser in zip(models, optimisers):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            optimiser.step()
            optimiser.zero_grad()
    start = PolicyAndCritic(_gpt2(), _gpt2(seed=1))
    for (_, a), (_, b), (_, s) in zip(models[0].named_parameters(), models[1].named_parameters(),
                                      start.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
        assert not torch.equal(a, s)

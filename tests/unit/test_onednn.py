"""oneDNN's packed linear layers (`rlhf.onednn`): the same function as torch's linear layers, values and gradients
within float32 rounding (losses and gradients of a PPO pass within 1e-6), only inside the block, only where they
apply."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import rlhf.onednn as onednn
from rlhf.onednn import packed_linears

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN linear kernels")


@pytest.fixture(autouse=True)
def pack_small_layers(monkeypatch):
    """The layers here are smaller than the packing threshold; pack them anyway (one test restores it)."""
    monkeypatch.setattr(onednn, "MIN_PACKED_WEIGHTS", 1)


@pytest.fixture
def calls(monkeypatch):
    """Counts products that went through the packed kernel."""
    counter = {"packed": 0}
    real = onednn._linear

    def spy(*args):
        counter["packed"] += 1
        return real(*args)

    monkeypatch.setattr(onednn, "_linear", spy)
    return counter


def _gpt2(seed: int = 0, width: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=width, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=1))


def _layer(kind: str, bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(48, 40)  # transformers' [in, out] layout (GPT-2); it always has a bias
        torch.nn.init.normal_(layer.bias)
        return layer
    return torch.nn.Linear(40, 48, bias=bias)


@pytest.mark.parametrize("kind, bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_a_packed_layer_gives_the_same_outputs_and_gradients(kind, bias, calls):
    layer = _layer(kind, bias)
    x = torch.randn(3, 7, 40)
    x_plain, x_packed = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(3, 7, 48)

    plain = layer(x_plain)
    (plain * weight).sum().backward()
    grads_plain = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with packed_linears(layer) as packed_layers:
        packed = layer(x_packed)
        (packed * weight).sum().backward()
    assert packed_layers == 1 and calls["packed"] == 1
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x_packed.grad, x_plain.grad, rtol=1e-6, atol=1e-5)
    for got, want in zip((p.grad for p in layer.parameters()), grads_plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # Under inference mode the same kernel runs, without autograd.
    with torch.inference_mode(), packed_linears(layer):
        torch.testing.assert_close(layer(x), plain.detach(), rtol=1e-6, atol=1e-5)
    assert calls["packed"] == 2


def test_a_ppo_pass_gives_the_same_loss_and_gradients():
    from rlhf.ppo.losses import policy_loss
    from rlhf.ppo.rollout import policy_forward

    model = _gpt2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    old = torch.randn(4, 10, generator=g) - 5
    advantages = torch.randn(4, 10, generator=g)
    results = []
    for enabled in (False, True):
        model.zero_grad()
        with packed_linears(model, enabled=enabled) as n:
            logprobs, entropy = policy_forward(model, ids, mask, 10, temperature=0.7, with_entropy=True)
            loss, _ = policy_loss(logprobs, old, advantages, torch.ones_like(old, dtype=torch.bool), clip_range=0.2)
            loss.backward()
        assert n == (9 if enabled else 0)  # four per block and the output head
        results.append((logprobs.detach(), entropy, loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (lp_a, ent_a, loss_a, grads_a), (lp_b, ent_b, loss_b, grads_b) = results
    assert torch.allclose(lp_a, lp_b, atol=1e-6, rtol=0) and torch.allclose(ent_a, ent_b, atol=1e-6, rtol=0)
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads_a, grads_b))


def test_generation_samples_the_same_tokens_when_packed():
    from rlhf.ppo.rollout import GenerationSettings, generate

    model = _gpt2().eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    uniforms = torch.rand(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(1,),
                                  pad_token_id=0)
    with torch.inference_mode():
        plain = generate(model, prompts, uniforms, settings, "cpu")
        with packed_linears(model):
            packed = generate(model, prompts, uniforms, settings, "cpu")
    assert torch.equal(plain.response_ids, packed.response_ids)
    assert torch.allclose(plain.logprobs, packed.logprobs, atol=1e-6, rtol=0)


def test_the_block_restores_the_layers_and_leaves_alone_what_it_cannot_pack(calls):
    class OwnLinear(torch.nn.Linear):  # a subclass with a forward of its own (a quantised linear, say)
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), OwnLinear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    with packed_linears(model, None) as n:
        assert n == 1 and "forward" in model[0].__dict__
        assert "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__
        with packed_linears(model) as inner:  # nested: the outer block's packing stays
            assert inner == 0
        assert "forward" in model[0].__dict__
        model[0](torch.randn(2, 8))
    assert not any("forward" in layer.__dict__ for layer in model)
    assert calls["packed"] == 1
    model[0](torch.randn(2, 8))
    assert calls["packed"] == 1  # outside the block: torch's own kernel
    with packed_linears(model, enabled=False) as n:
        assert n == 0
    # An exception inside the block still restores the layers.
    with pytest.raises(RuntimeError, match="boom"), packed_linears(model):
        raise RuntimeError("boom")
    assert "forward" not in model[0].__dict__


def test_without_onednn_the_block_changes_nothing(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    layer = torch.nn.Linear(4, 4)
    with packed_linears(layer) as n:
        assert n == 0 and "forward" not in layer.__dict__


def test_trainer_callback_packs_from_step_begin_to_the_optimiser_step():
    layer = torch.nn.Linear(4, 4)
    callback = onednn.packed_linears_callback(layer)
    callback.on_step_begin(None, None, None)
    assert "forward" in layer.__dict__
    callback.on_pre_optimizer_step(None, None, None)
    assert "forward" not in layer.__dict__
    callback.on_step_begin(None, None, None)
    callback.on_train_end(None, None, None)  # training stopped inside a step
    assert "forward" not in layer.__dict__


def test_stages_pack_only_where_it_is_safe():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhf.config import ModelConfig
    from rlhf.runtime import onednn_linears

    def accelerator(distributed_type=DistributedType.NO, backend="NO"):
        plugin = SimpleNamespace(backend=SimpleNamespace(value=backend))
        return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(dynamo_plugin=plugin))

    on, off = ModelConfig(), ModelConfig(onednn_linears=False)
    assert onednn_linears(accelerator(), on) and not onednn_linears(accelerator(), off)
    assert not onednn_linears(accelerator(DistributedType.DEEPSPEED), on)  # ZeRO-3 gathers weights in forward
    assert not onednn_linears(accelerator(backend="INDUCTOR"), on)  # torch.compile traces the forwards
    # A process state without a dynamo plugin (the evaluation stage's).
    assert onednn_linears(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), on)


def test_a_kernel_that_computes_something_else_is_not_used(monkeypatch):
    monkeypatch.setattr(onednn, "_linear", lambda x, packed, bias: torch.zeros(x.shape[0], 40))
    onednn.available.cache_clear()
    try:
        assert not onednn.available()
    finally:
        onednn.available.cache_clear()


def test_layers_below_the_threshold_keep_torchs_kernel(monkeypatch):
    monkeypatch.setattr(onednn, "MIN_PACKED_WEIGHTS", 1 << 17)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(128, 1023), Conv1D(1024, 128))
    with packed_linears(model) as n:
        assert n == 2 and "forward" in model[0].__dict__ and "forward" in model[2].__dict__
        assert "forward" not in model[1].__dict__  # 130,944 weights: under 2^17

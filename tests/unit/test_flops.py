"""Model FLOPs against counts made by hand on small models, the peak a utilisation is measured against, and a PPO
run's utilisation within (0, 1]."""

from __future__ import annotations

import pytest
import torch

from rlhf.flops import ModelShape, model_flops, peak_flops
from rlhf.ppo.flops import UpdateFlops


def gpt2(**kwargs):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, n_inner=32, vocab_size=16, n_positions=32,
                                      **kwargs))


def test_a_gpt2_forward_and_backward_counted_by_hand():
    shape = ModelShape.of(gpt2())
    # Per layer: c_attn 8x24, attn c_proj 8x8, mlp c_fc 8x32, mlp c_proj 32x8; two layers; the LM head 8x16 (tied
    # to the embedding, a matmul all the same). The embeddings and layer norms are no matmuls.
    macs = 2 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8) + 8 * 16
    assert (shape.linear_macs, shape.trainable_linear_macs, shape.layers, shape.attention_width) == (1664, 1664, 2, 8)
    assert macs == 1664
    # Sequences of 3 and 5 tokens: 8 positions; causal attention sees 1+2+3 and 1+..+5 keys = 21.
    linear = 2 * 1664 * 8
    attention = 2 * 2 * 2 * 8 * 21  # two matmuls (scores, weighted values) x 2 FLOPs x layers x width x keys
    assert model_flops(shape, [3, 5]) == linear + attention == 27968
    # Backward: input gradients (as the forward), weight gradients (as the forward), four attention matmuls.
    assert model_flops(shape, [3, 5], backward=True) == 3 * 27968


def test_a_llama_with_grouped_query_attention_and_a_gated_mlp_counted_by_hand():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                         intermediate_size=24, num_hidden_layers=1, vocab_size=32,
                                         tie_word_embeddings=False))
    shape = ModelShape.of(model)
    # q 16x16, k and v 16x8 (2 key-value heads of 4), o 16x16, gate and up 16x24, down 24x16; the LM head 16x32.
    assert shape.linear_macs == 256 + 128 + 128 + 256 + 384 + 384 + 384 + 512
    assert shape.attention_width == 16  # the queries' 4 heads x 4
    assert model_flops(shape, [4]) == 2 * 2432 * 4 + 4 * 1 * 16 * (1 + 2 + 3 + 4)


def test_lora_trains_a_few_weights_and_its_reference_runs_without_them():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    shape, reference = ModelShape.of(model), ModelShape.of(model, adapters=False)
    lora = 2 * (8 * 2 + 2 * 24)  # A: 8 -> 2 and B: 2 -> 24, in each of two layers
    assert (shape.linear_macs, shape.trainable_linear_macs) == (1664 + lora, lora)
    assert (reference.linear_macs, reference.trainable_linear_macs) == (1664, 0)
    # Frozen weights need their input gradients, not their weight gradients.
    forward = model_flops(shape, [5])
    attention = 4 * 2 * 8 * 15
    assert model_flops(shape, [5], backward=True) == forward + (forward - attention) + 2 * lora * 5 + 2 * attention


def test_an_encoder_attends_to_every_position():
    causal, encoder = ModelShape(10, 10, 1, 4, causal=True), ModelShape(10, 10, 1, 4, causal=False)
    assert model_flops(encoder, [3]) - model_flops(causal, [3]) == 4 * 4 * (9 - 6)


def test_one_ppo_update_counts_each_pass_once():
    shape = ModelShape.of(gpt2())
    flops = UpdateFlops(shape, shape, critic=shape, reward=None, reuse_logprobs=True, peak=1.0, peak_source="")
    lengths = [3, 5]
    counted = flops.count(lengths, None, epochs=2)
    assert counted["generate"] == model_flops(shape, [2, 4])  # the last token is sampled, never fed back
    assert counted["score"] == 2 * model_flops(shape, lengths)  # reference and critic; the policy's log-probs reused
    assert counted["train"] == 2 * 2 * 3 * model_flops(shape, lengths)  # 2 epochs x (policy + critic) x fwd + bwd
    again = UpdateFlops(shape, shape, None, shape, reuse_logprobs=False, peak=1.0, peak_source="")
    assert again.count(lengths, [4, 7], epochs=1)["score"] == 2 * model_flops(shape, lengths) + model_flops(
        shape, [4, 7])


def test_the_peak_is_a_gpus_table_value_or_a_measured_matmul(monkeypatch):
    peak, source = peak_flops("cpu", torch.float32, 1)
    assert 1e8 < peak < 1e14 and source.startswith("measured:")
    peak_flops.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, expected in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                           ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak_flops.cache_clear()
        assert peak_flops("cuda:0", torch.bfloat16) == (
            expected, f"{name}: dense bf16 peak {expected / 1e12:.0f} TFLOP/s (vendor table)")
    peak_flops.cache_clear()


def test_ppo_logs_utilisation_within_zero_and_one(tmp_path):
    from support import demo_rows, save_tiny_sft_and_reward, write_jsonl

    from rlhf.checkpoint import read_manifest
    from rlhf.config import PPOConfig, load_config
    from rlhf.tracking import read_metrics
    from stages import ppo

    sft, rm = save_tiny_sft_and_reward(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo_rows("prompts.jsonl", 16))
    out = ppo.run(load_config(PPOConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}",
        f"data.path={prompts}", "checks.min_eos_rate=0", "rollout.batch_size=8",
        "rollout.max_new_tokens=6", "rollout.score_norm=none", "ppo.num_updates=2", "ppo.micro_batch_size=8",
        "eval.num_prompts=4", "eval.gold_judge=false", "logging.report_to=[jsonl]"]))
    rows = [r for r in read_metrics(out) if "perf/utilisation" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["perf/flops_generate"] > 0 and row["perf/flops_score"] > 0 and row["perf/flops_train"] > 0
        for key in ("perf/utilisation", "perf/utilisation_generate", "perf/utilisation_train"):
            assert 0 < row[key] <= 1, (key, row[key])
    manifest = read_manifest(out)
    assert 0 < manifest["metrics"]["perf/utilisation"] <= 1
    assert manifest["peak_flops"]["per_process"] > 0 and "matmul" in manifest["peak_flops"]["source"]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_count_matches_the_matmuls_torch_runs(architecture):
    """torch's FLOP counter over one unpadded sequence, forward and backward, with eager attention (which computes
    every score and masks the future ones out: the count of a non-causal shape)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    if architecture == "gpt2":
        model = gpt2(attn_implementation="eager")
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=4, intermediate_size=24, num_hidden_layers=2, vocab_size=32,
                                             tie_word_embeddings=False, attn_implementation="eager"))
    ids = torch.tensor([[1, 5, 3, 2, 7, 4]])
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(ids)
    with FlopCounterMode(display=False) as both:
        model(ids).logits.sum().backward()
    dense = dataclasses.replace(ModelShape.of(model), causal=False)
    assert forward.get_total_flops() == model_flops(dense, [6])
    assert both.get_total_flops() == model_flops(dense, [6], backward=True)

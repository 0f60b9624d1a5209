"""The model-state bytes a process holds, measured off its tensors: weights as stored (a tied weight once, a ZeRO-3
shard as the shard), the optimiser's moments and any master copies it steps."""

from __future__ import annotations

import torch

from rlhf.memory import MIB, optimizer_bytes, peak_rss_mib, process_memory, weight_bytes


def test_weights_count_each_storage_once_and_a_shard_as_stored():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's head and embedding
    assert weight_bytes(model) == 10 * 4 * 4
    shard = torch.nn.Linear(8, 8, bias=False)
    shard.weight.data = torch.empty(0)  # what ZeRO-3 leaves in the parameter; its shard is ds_tensor
    shard.weight.ds_tensor = torch.zeros(32)
    assert weight_bytes(shard) == 32 * 4


def test_adam_holds_two_moments_per_trained_weight_and_a_separate_master_copy_counts():
    model = torch.nn.Linear(16, 16)  # 272 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 16)).sum().backward()
    optimizer.step()
    steps = sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values())
    assert optimizer_bytes(optimizer, model) == 2 * 272 * 4 + steps  # the weights stepped are the model's own
    # A wrapper that steps fp32 copies of the weights (DeepSpeed's partitions): the copies are state too.
    masters = [p.detach().clone() for p in model.parameters()]
    wrapper = type("Wrapper", (), {"optimizer": torch.optim.AdamW(masters)})()
    assert optimizer_bytes(wrapper, model) == 272 * 4


def test_process_memory_in_mib():
    model = torch.nn.Linear(1024, 256, bias=False)
    memory = process_memory(model, torch.optim.SGD(model.parameters()), reference=model, reward=None)
    assert memory["trained_weights"] == memory["reference_weights"] == 1024 * 256 * 4 / MIB
    assert memory["reward_weights"] == 0 and memory["optimizer"] == 0
    assert 0 < memory["peak_rss"] <= peak_rss_mib()  # a peak only grows

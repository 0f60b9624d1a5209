"""The SFT stage on tiny models: every tuning method trains what it should and nothing else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support import (chatml_tokenizer, demo_rows, mean_batch_spread, plain_tokenizer, save_tiny_causal_lm,
                     spy_on_length_grouping, spy_on_packed_products, spy_on_step_sorting, write_jsonl)

from rlhf.checkpoint import read_manifest
from rlhf.config import SFTConfig, load_config
from rlhf.errors import CheckpointError
from rlhf.tracking import read_metrics
from stages import sft


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model = save_tiny_causal_lm(root / "base", plain_tokenizer())
    data = write_jsonl(root / "sft.jsonl", demo_rows("sft.jsonl", 96))
    return root, model, data


def _cfg(root, model, data, name, *extra):
    return load_config(SFTConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={model}", f"data.path={data}", "data.eval_fraction=0.1",
        "train.max_steps=12", "train.batch_size=16", "train.micro_batch_size=8", "optim.learning_rate=3e-3",
        "optim.warmup_ratio=0", "logging.log_every=1", "train.eval_every=100", *extra,
    ])


def _weights(path):
    return load_file(path / "model.safetensors")


def _losses(out):
    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def test_full_finetune_trains_every_parameter_and_reloads(base):
    from transformers import AutoModelForCausalLM

    root, model, data = base
    out = sft.run(_cfg(root, model, data, "full"))
    manifest = read_manifest(out)
    assert manifest["stage"] == "sft" and manifest["saved_as"] == "model"
    losses = _losses(out)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert manifest["metrics"]["eval/loss"] < 10
    before, after = _weights(model), _weights(out)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_merged_changes_only_targeted_weights(base):
    root, model, data = base
    out = sft.run(_cfg(root, model, data, "lora", "peft.method=lora", "peft.lora_r=4",
                       "peft.target_modules=[c_attn]"))
    before, after = _weights(model), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "c_attn.weight" in k}
    assert read_manifest(out)["saved_as"] == "model"


def test_lora_adapter_output_and_downstream_load(base):
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    root, model, data = base
    out = sft.run(_cfg(root, model, data, "adapter", "peft.method=lora", "peft.save=adapter"))
    assert (out / "adapter_config.json").is_file() and read_manifest(out)["saved_as"] == "adapter"
    merged = load_causal_lm(ModelConfig(name_or_path=str(out)))  # base + adapter, merged on load
    base_weights = _weights(model)
    assert not torch.equal(merged.state_dict()["transformer.h.0.attn.c_attn.weight"],
                           base_weights["transformer.h.0.attn.c_attn.weight"])


def test_partial_tuning_trains_only_the_top_block(base):
    root, model, data = base
    out = sft.run(_cfg(root, model, data, "partial", "peft.method=partial", "peft.trainable_top_blocks=1"))
    before, after = _weights(model), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("transformer.h.1.") for k in changed)
    assert any(k.startswith("transformer.h.1.") and "mlp" in k for k in changed)


def test_prefix_tuning_saves_an_adapter_that_later_stages_refuse(base):
    from rlhf.config import ModelConfig
    from rlhf.models import check_model_source

    root, model, data = base
    out = sft.run(_cfg(root, model, data, "prefix", "peft.method=prefix", "peft.num_virtual_tokens=4"))
    assert read_manifest(out)["saved_as"] == "adapter"
    with pytest.raises(CheckpointError, match="holds a prefix-tuning adapter, which later stages cannot use"):
        check_model_source(ModelConfig(name_or_path=str(out)))


def test_stop_token_is_in_the_labels(base):
    from stages.sft import encode_example

    from rlhf.text import TextContract

    contract = TextContract.from_tokenizer(plain_tokenizer())
    row = {"prompt": "the lamp", "completion": " is great ."}
    example = encode_example(contract, row)
    labelled = [i for i, m in zip(example["input_ids"], example["completion_mask"]) if m]
    assert labelled[-1] == contract.tokenizer.eos_token_id


def test_conversational_data_on_a_qwen2_model(tmp_path):
    model = save_tiny_causal_lm(tmp_path / "qwen", chatml_tokenizer(), model_type="qwen2")
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]}
            for r in demo_rows("sft.jsonl", 48)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = sft.run(_cfg(tmp_path, model, data, "chat", "train.max_steps=4", "data.max_length=256"))
    losses = _losses(out)
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
    assert read_manifest(out)["chat_template_added"] is False


def test_packing_trains(base):
    root, model, data = base
    out = sft.run(_cfg(root, model, data, "packed", "packing=true", "data.max_length=128", "train.max_steps=4"))
    losses = _losses(out)
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))


def test_sorted_micro_batches_train_the_same_sft_model(base, monkeypatch):
    root, model, data = base
    seen = spy_on_step_sorting(monkeypatch)
    runs = {}
    for name, flag in (("sorted", "true"), ("unsorted", "false")):
        out = sft.run(_cfg(root, model, data, f"mb-{name}", f"train.sort_micro_batches={flag}",
                           "train.micro_batch_size=4", "train.max_steps=6", "data.max_length=256"))
        runs[name] = (_losses(out), _weights(out))
    assert len(seen) == 1
    (sorted_losses, sorted_weights), (losses, weights) = runs["sorted"], runs["unsorted"]
    # The SFT loss is a token mean over the whole step (num_items_in_batch), so the cut into micro-batches is moot.
    assert len(losses) == 6 and sorted_losses == pytest.approx(losses, abs=1e-5)
    for name, tensor in weights.items():
        assert torch.allclose(sorted_weights[name], tensor, atol=1e-5), name


def test_group_by_length_sorts_sft_examples_into_batches_of_similar_length(base, monkeypatch):
    root, model, data = base
    seen = spy_on_length_grouping(monkeypatch)
    out = sft.run(_cfg(root, model, data, "grouped", "train.group_by_length=true", "train.batch_size=4",
                       "train.micro_batch_size=4", "data.max_length=256"))
    losses = _losses(out)
    assert seen and all(torch.isfinite(torch.tensor(losses)))
    order, lengths = seen[0]
    assert mean_batch_spread(order, lengths, 4) < 0.5 * (max(lengths) - min(lengths))


def test_onednn_packed_linears_train_the_same_sft_model(base, monkeypatch):
    packed_products = spy_on_packed_products(monkeypatch)
    root, model, data = base
    runs = {}
    for flag in ("true", "false"):
        before = len(packed_products)
        out = sft.run(_cfg(root, model, data, f"onednn-{flag}", f"model.onednn_linears={flag}", "train.max_steps=4"))
        runs[flag] = (_losses(out), _weights(out), len(packed_products) - before)
    # Every micro-batch's forward ran through the packed kernel when asked to, none otherwise.
    assert runs["true"][2] > 0 and runs["false"][2] == 0
    assert runs["true"][0] == pytest.approx(runs["false"][0], abs=1e-5)
    for name, tensor in runs["false"][1].items():
        assert torch.allclose(runs["true"][1][name], tensor, atol=1e-5), name

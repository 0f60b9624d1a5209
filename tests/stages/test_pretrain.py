"""The pretraining stage on a tiny generated corpus: the loss falls, the output follows the contract and reloads."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf.checkpoint import read_manifest
from rlhf.config import PretrainConfig, load_config
from rlhf.tracking import read_metrics
from stages import pretrain

WORDS = {"s": ["the lamp", "this kettle", "the fan", "my phone"], "v": ["is", "was", "feels"],
         "a": ["great", "bad", "quiet", "loud", "cheap", "solid"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as handle:
        for _ in range(600):
            sentences = [f"{rng.choice(WORDS['s'])} {rng.choice(WORDS['v'])} {rng.choice(WORDS['a'])} ."
                         for _ in range(rng.randint(1, 2))]
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def _config(tmp_path, corpus, objective, steps, *extra):
    return load_config(PretrainConfig, None, [
        f"objective={objective}", f"output_dir={tmp_path / objective}", f"run_dir={tmp_path}",
        f"data.path={corpus}", "data.eval_fraction=0.05", "tokenizer.vocab_size=300", "tokenizer.min_frequency=1",
        "arch.n_layer=2", "arch.n_embd=32", "arch.n_head=2", "arch.n_positions=32", "seq_len=32",
        f"max_steps={steps}", "batch_size=16", "micro_batch_size=8", "optim.learning_rate=3e-3",
        "logging.log_every=5", "eval_every=1000", *extra,
    ])


def test_clm_pretrain_learns_saves_and_samples_eos(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(tmp_path, corpus, "clm", steps=120)
    out = pretrain.run(cfg)

    manifest = read_manifest(out)
    assert manifest is not None and manifest["stage"] == "pretrain"
    metrics = manifest["metrics"]
    assert metrics["train/loss"] < 0.5 * metrics["train/first_loss"]
    assert metrics["eval/loss"] < 0.5 * metrics["train/first_loss"]
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    logged = [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == 24 and logged[-1] < logged[0]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    torch.manual_seed(0)
    start = torch.full((20, 1), tokenizer.eos_token_id)
    samples = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=30,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ended = sum(int((row[1:] == tokenizer.eos_token_id).any()) for row in samples)
    assert ended >= 16  # the model learned where documents end


@pytest.mark.parametrize("objective, head", [("mlm", "AutoModelForMaskedLM"), ("mlm_nsp", "BertForPreTraining")])
def test_encoder_pretrain_learns_and_reloads(tmp_path, corpus, objective, head):
    import transformers

    cfg = _config(tmp_path, corpus, objective, steps=40)
    out = pretrain.run(cfg)
    metrics = read_manifest(out)["metrics"]
    assert metrics["train/loss"] < 0.7 * metrics["train/first_loss"]
    getattr(transformers, head).from_pretrained(out)
    # The encoder is a reward-model backbone: it loads with a fresh score head.
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = tokenizer(["the fan is quiet ."], return_tensors="pt")
    assert enc["input_ids"][0, 0] == tokenizer.cls_token_id
    assert scorer(**enc).logits.shape == (1, 1)


def test_rerun_with_same_config_reproduces_weights(tmp_path, corpus):
    from safetensors.torch import load_file

    cfg = _config(tmp_path, corpus, "clm", steps=5)
    first = load_file(pretrain.run(cfg) / "model.safetensors")
    fingerprint = read_manifest(tmp_path / "clm")["fingerprint"]
    second = load_file(pretrain.run(cfg) / "model.safetensors")
    assert read_manifest(tmp_path / "clm")["fingerprint"] == fingerprint
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("objective", "fault"), [("clm", "checkpoint_write:6"), ("mlm", "after_checkpoint:6")])
def test_resume_after_a_stop_ends_bitwise_where_an_uninterrupted_run_does(tmp_path, corpus, monkeypatch, objective,
                                                                        fault):
    from safetensors.torch import load_file

    from rlhf.checkpoint import list_checkpoints
    from rlhf.signals import FAULT_ENV, InjectedFault

    def cfg(name, *extra):
        return _config(tmp_path / name, corpus, objective, 10, "logging.log_every=1", "eval_every=5",
                       "checkpoint.save_every=3", *extra)

    straight = pretrain.run(cfg("straight"))
    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(InjectedFault):
        pretrain.run(cfg("cut"))
    cut = tmp_path / "cut" / objective
    assert read_manifest(cut) is None
    assert list_checkpoints(cut)[-1] == (6 if fault.startswith("after") else 3)
    monkeypatch.delenv(FAULT_ENV)
    resumed = pretrain.run(cfg("cut", "checkpoint.resume=true"))

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def rows(out):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in read_metrics(out / "metrics.jsonl")]

    assert rows(straight) == rows(resumed)

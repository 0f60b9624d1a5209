"""The reward stage on tiny models: decoder and encoder backbones, full and LoRA, scores at the last real token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import (demo_rows, mean_batch_spread, plain_tokenizer, save_tiny_causal_lm, spy_on_length_grouping,
                     spy_on_step_sorting, write_jsonl)

from rlhf.checkpoint import REWARD_STATS_FILE, read_manifest
from rlhf.config import PretrainConfig, RewardConfig, load_config
from rlhf.models import score_sequences
from rlhf.tracking import read_metrics
from stages import pretrain, reward


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    model = save_tiny_causal_lm(root / "sft", plain_tokenizer())
    data = write_jsonl(root / "prefs.jsonl", demo_rows("preferences.jsonl", 96))
    return root, model, data


def _cfg(root, model, data, name, *extra):
    return load_config(RewardConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={model}", f"data.path={data}", "data.eval_fraction=0.1",
        "data.max_length=256", "train.max_steps=10", "train.batch_size=16", "train.micro_batch_size=8",
        "optim.learning_rate=3e-3", "optim.warmup_ratio=0", "logging.log_every=1", "train.eval_every=100", *extra,
    ])


def test_decoder_reward_model_trains_and_records_stats(setup):
    from transformers import AutoModelForSequenceClassification

    root, model, data = setup
    out = reward.run(_cfg(root, model, data, "full"))
    manifest = read_manifest(out)
    losses = [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    for key in ("eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std"):
        assert key in manifest["metrics"]
    stats = json.loads((out / REWARD_STATS_FILE).read_text())
    assert stats["std"] > 0 and stats == {**stats, **manifest["reward_stats"]}
    scorer = AutoModelForSequenceClassification.from_pretrained(out)
    assert scorer.config.num_labels == 1


def test_the_manifest_holds_the_gate_and_the_report_of_the_held_out_pairs(setup):
    """The report's numbers are those of `rlhf.reward_report` on the held-out pairs' scores, lengths and verdicts."""
    from rlhf.demo.judge import judge
    from rlhf.models import load_tokenizer
    from rlhf.reward_report import reward_model_report
    from rlhf.text import RewardText

    root, model, data = setup
    out = reward.run(_cfg(root, model, data, "report", "gold_judge=true", "min_eval_accuracy=0.3"))
    manifest = read_manifest(out)
    report, metrics = manifest["report"], manifest["metrics"]
    assert manifest["gate"] == {"min_eval_accuracy": 0.3, "eval_accuracy": metrics["eval/accuracy"],
                                "passed": metrics["eval/accuracy"] >= 0.3}
    assert report["num_pairs"] == manifest["data"]["num_eval"] and report["accuracy"] == metrics["eval/accuracy"]
    for key in ("length_correlation", "expected_calibration_error", "gold_agreement"):
        assert metrics[f"eval/{key}"] == report[key]
    assert sum(b["pairs"] for b in report["by_length"]) == report["num_pairs"]
    assert sum(c["pairs"] for c in report["calibration"]) == report["num_pairs"]
    # Recompute from the saved model, the held-out rows and the judge.
    from rlhf.data import prepare_dataset

    rows = prepare_dataset(str(data), "preference", eval_fraction=0.1, seed=0, max_length=256,
                           token_length=lambda r: 0).eval
    text = RewardText.for_model(load_tokenizer(_cfg(root, out, data, "x").model), is_encoder=False)
    scores = {side: score_sequences(load_scorer(out), [text.ids(r["prompt"], r[side]) for r in rows],
                                    pad_token_id=text.tokenizer.pad_token_id).tolist() for side in ("chosen", "rejected")}
    lengths = {side: [len(text.contract.response_ids(r["prompt"], r[side])) for r in rows] for side in scores}
    gold = [(judge(r["prompt"], r["chosen"], True).combined, judge(r["prompt"], r["rejected"], True).combined)
            for r in rows]
    expected = reward_model_report(scores["chosen"], scores["rejected"], lengths["chosen"], lengths["rejected"], gold)
    assert report["by_length"] == expected["by_length"] and report["gold_pairs"] == expected["gold_pairs"]
    assert report["gold_agreement"] == pytest.approx(expected["gold_agreement"])
    assert report["length_correlation"] == pytest.approx(expected["length_correlation"], abs=1e-5)


def load_scorer(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def test_lora_reward_model_trains_its_score_head(setup):
    root, model, data = setup
    out = reward.run(_cfg(root, model, data, "lora", "peft.method=lora", "peft.lora_r=4",
                          "peft.target_modules=[c_attn]"))
    after = load_file(out / "model.safetensors")
    before = load_file(model / "model.safetensors")
    assert "score.weight" in after
    # The stage seeds before loading, so the fresh head it started from can be rebuilt; training moved it.
    from rlhf.config import ModelConfig
    from rlhf.models import load_sequence_scorer
    from rlhf.runtime import seed_everything

    seed_everything(0)
    initial = load_sequence_scorer(ModelConfig(name_or_path=str(model)), pad_token_id=0).score.weight.detach()
    assert not torch.allclose(after["score.weight"], initial, atol=1e-6)
    changed = {k for k in before if k.startswith("transformer.") and not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "c_attn.weight" in k}


def test_encoder_backbone(setup, tmp_path):
    root, _, data = setup
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["prompt"] + r["chosen"]}
                                                     for r in demo_rows("preferences.jsonl", 200)])
    encoder = pretrain.run(load_config(PretrainConfig, None, [
        "objective=mlm", f"output_dir={tmp_path / 'encoder'}", f"data.path={corpus}", "tokenizer.vocab_size=300",
        "arch.n_layer=2", "arch.n_embd=32", "arch.n_head=2", "arch.n_positions=256", "seq_len=64", "max_steps=3",
        "batch_size=8", "micro_batch_size=8"]))
    out = reward.run(_cfg(root, encoder, data, "encoder"))
    manifest = read_manifest(out)
    assert manifest["reward_stats"]["backbone"] == "encoder"
    assert 0.0 <= manifest["metrics"]["eval/accuracy"] <= 1.0


def test_score_is_read_at_the_last_real_token_for_both_padding_sides(setup):
    from transformers import AutoModelForSequenceClassification

    root, model, _ = setup
    tokenizer = plain_tokenizer()
    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).eval()
    scorer.config.pad_token_id = tokenizer.pad_token_id
    seqs = [[0, 5, 6, 7, 0], [0, 9, 0], [0, 4, 4, 4, 4, 4, 4, 0]]
    alone = torch.tensor([scorer(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
    right = score_sequences(scorer, seqs, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    width = max(map(len, seqs))
    left_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs])
    left_mask = (left_ids != tokenizer.pad_token_id).long()
    position_ids = (left_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        left = scorer(input_ids=left_ids, attention_mask=left_mask, position_ids=position_ids).logits[:, 0]
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_margin_column_enters_the_loss(setup, tmp_path):
    root, model, _ = setup
    rows = [dict(r, margin=2.0) for r in demo_rows("preferences.jsonl", 48)]
    data = write_jsonl(tmp_path / "margins.jsonl", rows)
    plain = reward.run(_cfg(tmp_path, model, write_jsonl(tmp_path / "plain.jsonl", demo_rows("preferences.jsonl", 48)),
                            "plain", "train.max_steps=1"))
    with_margin = reward.run(_cfg(tmp_path, model, data, "margin", "train.max_steps=1"))
    first = {name: [r for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r][0]["train/loss"]
             for name, d in (("plain", plain), ("margin", with_margin))}
    # -log sigmoid(r_c - r_r - m) with m = 2 is larger than without a margin on the same first batch.
    assert first["margin"] > first["plain"] + 1.0


def test_group_by_length_batches_pairs_of_similar_length(setup, monkeypatch):
    root, model, data = setup
    seen = spy_on_length_grouping(monkeypatch)
    # transformers sorts groups of up to 50 batches, at most a quarter of the data: batches of 4 make groups of 20.
    out = reward.run(_cfg(root, model, data, "grouped", "train.group_by_length=true", "train.batch_size=4",
                          "train.micro_batch_size=4"))
    assert read_manifest(out) is not None and seen
    order, lengths = seen[0]
    assert mean_batch_spread(order, lengths, 4) < 0.5 * (max(lengths) - min(lengths))  # random batches would span nearly the whole range


def test_sorted_micro_batches_train_the_same_model(setup, monkeypatch):
    # Each step's 16 pairs are cut into micro-batches of 4 by length instead of at random: same pairs, same gradient.
    # (A large Adam epsilon keeps each step proportional to the gradient: with the default, weights whose gradient is
    # near 0, such as rarely reached position embeddings, move by the learning rate in the direction of float32
    # rounding noise, which the two summation orders differ in.)
    root, model, data = setup
    seen = spy_on_step_sorting(monkeypatch)
    runs = {}
    for name, flag in (("sorted", "true"), ("unsorted", "false")):
        out = reward.run(_cfg(root, model, data, name, f"train.sort_micro_batches={flag}", "train.micro_batch_size=4",
                              "train.max_steps=6", "optim.adam_epsilon=1e-2"))
        runs[name] = ([r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r],
                      load_file(out / "model.safetensors"))
    assert len(seen) == 1  # only the sorted run drew through the sampler
    (sorted_losses, sorted_weights), (losses, weights) = runs["sorted"], runs["unsorted"]
    assert len(losses) == 6 and sorted_losses == pytest.approx(losses, abs=1e-5)
    for name, tensor in weights.items():
        assert torch.allclose(sorted_weights[name], tensor, atol=1e-5), name
    assert any(not torch.equal(tensor, load_file(model / "model.safetensors").get(name, tensor))
               for name, tensor in weights.items())  # and training did move the weights


def test_fused_adamw_trains_the_same_reward_model(setup, monkeypatch):
    # The TRL stages take torch's fused AdamW where it serves (CPU here); the loop over tensors gives the same weights.
    import rlhf.trl_bridge

    root, model, data = setup
    made = []
    init = torch.optim.AdamW.__init__

    def spy(self, *args, **kwargs):
        made.append(bool(kwargs.get("fused")))
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    # With eps = 1 Adam's step is proportional to the gradient; with a tiny eps it is lr * sign(g), and rounding
    # flips the sign of near-zero gradients between any two implementations.
    extra = ("train.max_steps=4", "optim.learning_rate=1.0", "optim.adam_epsilon=1.0")
    fused = reward.run(_cfg(root, model, data, "fused-adamw", *extra))
    monkeypatch.setattr(rlhf.trl_bridge, "fused_adamw", lambda state, device_type: False)
    looped = reward.run(_cfg(root, model, data, "looped-adamw", *extra))
    assert made == [True, False]
    w_fused, w_looped = load_file(fused / "model.safetensors"), load_file(looped / "model.safetensors")
    for name, tensor in w_looped.items():
        assert torch.allclose(w_fused[name], tensor, atol=1e-5), name
    assert any(not torch.allclose(w_fused[k], v, atol=1e-3) for k, v in load_file(model / "model.safetensors").items()
               if k in w_fused)


def test_scores_come_back_in_the_order_of_the_sequences(setup):
    from transformers import AutoModelForSequenceClassification

    root, model, _ = setup
    scorer = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    pad = scorer.config.pad_token_id  # the head finds the last real token by this id
    sequences = [[5 + (i % 7)] * (3 + (i * 5) % 17) for i in range(40)]
    batched = score_sequences(scorer, sequences, pad_token_id=pad, batch_size=8)
    one_by_one = torch.cat([score_sequences(scorer, [s], pad_token_id=pad) for s in sequences])
    assert torch.allclose(batched, one_by_one, atol=1e-5)

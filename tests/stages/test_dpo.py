"""The DPO stage on tiny models: the token ids it trains on, the reference (no copy with LoRA, one frozen copy
otherwise), each preference loss reaching TRL, the evaluation of a DPO policy without a reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import EVAL_RESULTS_FILE, read_manifest
from rlhf.config import DPOConfig, EvaluateConfig, load_config
from rlhf.data import prepare_dataset
from rlhf.errors import ConfigError
from rlhf.models import load_tokenizer
from rlhf.text import TextContract
from rlhf.tracking import read_metrics
from stages import dpo, evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model = save_tiny_causal_lm(root / "sft", plain_tokenizer())
    data = write_jsonl(root / "prefs.jsonl", demo_rows("preferences.jsonl", 48))
    return root, model, data


def config(setup, name: str, *extra: str) -> DPOConfig:
    root, model, data = setup
    return load_config(DPOConfig, None, [
        f"run_dir={root / name}", f"model.name_or_path={model}", f"data.path={data}", "data.eval_fraction=0.25",
        "data.max_length=256", "train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=4",
        "optim.learning_rate=1e-2", "optim.warmup_ratio=0", "logging.log_every=1", "train.eval_every=100", *extra,
    ])


def test_dpo_trains_on_exactly_the_text_contract_ids(setup, monkeypatch):
    """Every sequence of every batch is prompt ids + response ids by the text contract (the ids PPO samples and
    the reward model reads), the loss covers the response only, and each response holds one EOS, at its end."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batches = []
    original = DataCollatorForPreference.torch_call
    monkeypatch.setattr(DataCollatorForPreference, "torch_call",
                        lambda self, examples: batches.append(original(self, examples)) or batches[-1])
    cfg = config(setup, "ids", "train.max_steps=6")
    dpo.run(cfg)

    tokenizer = load_tokenizer(dpo.policy_model_config(cfg))
    contract = TextContract.from_tokenizer(tokenizer)
    rows = prepare_dataset(cfg.data.path, "preference", eval_fraction=0.0, seed=0).train
    expected = {}
    for row in rows:
        for side in ("chosen", "rejected"):
            ids, mask = contract.sequence(row["prompt"], row[side])
            expected[tuple(ids)] = mask
    eos = tokenizer.eos_token_id
    seen = 0
    for batch in batches:
        for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"],
                                              batch["completion_mask"]):
            n = int(attention.sum())
            assert attention[:n].all() and not attention[n:].any()  # right-padded
            sequence = tuple(ids[:n].tolist())
            assert sequence in expected, "a sequence the text contract does not give"
            assert completion[:n].tolist() == expected[sequence]
            response = [t for t, m in zip(sequence, expected[sequence]) if m]
            assert response.count(eos) == 1 and response[-1] == eos
            seen += 1
    assert seen >= 6 * 8 * 2 * 0.75  # training batches (and the evaluation's) went through: chosen and rejected


def conversational(row: dict) -> dict:
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}


def transcripts(row: dict) -> dict:
    return {side: f"\n\nHuman: {row['prompt']}\n\nAssistant:{row[side]}" for side in ("chosen", "rejected")}


@pytest.mark.parametrize("layout", [conversational, transcripts])
def test_dpo_reads_the_other_preference_layouts(setup, layout):
    """Message lists (the tokenizer gets the default chat template) and HH-style transcripts split at the
    assistant marker, as the reward stage reads them; the pairs trained on come from the text contract."""
    root = setup[0]
    data = write_jsonl(root / f"prefs-{layout.__name__}.jsonl",
                       [layout(r) for r in demo_rows("preferences.jsonl", 24)])
    out = dpo.run(config(setup, f"layout-{layout.__name__}", f"data.path={data}", "train.max_steps=2"))
    manifest = read_manifest(out)
    assert manifest["data"]["num_train"] + manifest["data"]["num_eval"] == 24
    assert math.isfinite(manifest["metrics"]["train/loss"])
    if layout is conversational:
        assert load_tokenizer(dpo.policy_model_config(config(setup, "x", f"model.name_or_path={out}"))).chat_template


def test_lora_dpo_loads_no_reference_copy(setup, monkeypatch):
    loads = []
    original = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda cfg: loads.append(cfg) or original(cfg))
    out = dpo.run(config(setup, "lora", "peft.method=lora", "peft.lora_r=4"))
    assert len(loads) == 1
    manifest = read_manifest(out)
    assert manifest["reference"] == "adapters disabled" and manifest["peft_method"] == "lora"
    assert manifest["metrics"]["trainable_parameters"] < manifest["metrics"]["total_parameters"]


def test_full_dpo_loads_one_frozen_reference_that_never_changes(setup, monkeypatch):
    loads, references = [], []
    load, copy = dpo.load_causal_lm, dpo.frozen_copy
    monkeypatch.setattr(dpo, "load_causal_lm", lambda cfg: loads.append(cfg) or load(cfg))
    monkeypatch.setattr(dpo, "frozen_copy", lambda cfg: references.append(copy(cfg)) or references[-1])
    out = dpo.run(config(setup, "full"))
    assert len(loads) == 2 and len(references) == 1
    reference = references[0]
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    start = load_file(setup[1] / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    state = reference.state_dict()
    assert all(torch.equal(state[k], start[k]) for k in start if k in state)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert read_manifest(out)["reference"] == "copy"


# The first step's loss, where the policy is its reference (h = 0): each loss's value at h = 0, derived by hand.
FIRST_LOSS = {"sigmoid": math.log(2), "robust": math.log(2), "sigmoid_norm": math.log(2), "hinge": 1.0,
              "ipo": (1 / (2 * 0.1)) ** 2, "apo_zero": 1.0}


@pytest.mark.parametrize("loss_type", sorted(FIRST_LOSS))
def test_each_preference_loss_reaches_trl(setup, loss_type):
    extra = ["label_smoothing=0.1"] if loss_type == "robust" else []
    out = dpo.run(config(setup, f"loss-{loss_type}", f"loss_type={loss_type}", "beta=0.1", "train.max_steps=1",
                         *extra))
    first = [r for r in read_metrics(out) if r.get("step") == 1 and "train/loss" in r][0]
    assert first["train/loss"] == pytest.approx(FIRST_LOSS[loss_type], rel=1e-4)
    assert read_manifest(out)["loss_type"] == loss_type


def test_the_sft_term_adds_the_chosen_responses_token_mean_nll(setup, monkeypatch):
    """RPO: at the first step (policy = reference) the loss is log 2 + weight x the chosen tokens' mean NLL,
    computed here by hand from the first batch and the starting model."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    batches = []
    original = DataCollatorForPreference.torch_call
    monkeypatch.setattr(DataCollatorForPreference, "torch_call",
                        lambda self, examples: batches.append(original(self, examples)) or batches[-1])
    out = dpo.run(config(setup, "rpo", "sft_loss_weight=0.5", "train.max_steps=1", "train.micro_batch_size=8"))
    first = [r for r in read_metrics(out) if r.get("step") == 1 and "train/loss" in r][0]
    batch = batches[0]
    half = batch["input_ids"].shape[0] // 2
    model = load_causal_lm(ModelConfig(name_or_path=str(setup[1]))).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:half], attention_mask=batch["attention_mask"][:half]).logits
    logps = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:half, 1:, None])[..., 0]
    nll = -logps[batch["completion_mask"][:half, 1:].bool()].mean().item()
    assert first["train/loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)


def test_held_out_pairs_give_the_implicit_reward_metrics(setup):
    metrics = read_manifest(dpo.run(config(setup, "metrics", "beta=0.5")))["metrics"]
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/reward_chosen", "eval/logratio_chosen"):
        assert math.isfinite(metrics[key])
    assert metrics["eval/logratio_chosen"] == pytest.approx(metrics["eval/reward_chosen"] / 0.5)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0


@pytest.mark.parametrize("overrides, message", [
    (["peft.method=prefix"], "peft.method=prefix"),
    (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing"),
    (["data.margin_from_scores=true"], "data.margin_from_scores"),
])
def test_config_errors_name_the_keys(setup, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(setup, "x", *overrides).validate()


def test_evaluate_compares_a_dpo_policy_without_a_reward_model(setup):
    root, model, _ = setup
    out = dpo.run(config(setup, "for-eval"))
    prompts = write_jsonl(root / "eval_prompts.jsonl", demo_rows("eval_prompts.jsonl", 6))
    cfg = load_config(EvaluateConfig, None, [
        f"run_dir={root / 'eval-run'}", f"sft_model.name_or_path={model}", f"dpo_model.name_or_path={out}",
        "policies=[dpo]", "reward_scores=false", f"data.path={prompts}", "num_prompts=6", "max_new_tokens=6",
        "temperature=0.7", "gold_judge=true", "samples=2"])
    cfg.validate()
    report = json.loads((evaluate.run(cfg) / EVAL_RESULTS_FILE).read_text())
    assert set(report) >= {"sft", "dpo", "win_rate_gold_dpo", "kl_dpo_to_reference"}
    assert "ppo" not in report and not any(k.startswith("win_rate_reward_model") for k in report)
    assert report["kl_dpo_to_reference"] != 0 and "score_mean" not in report["dpo"]  # a sample estimate: any sign
    with pytest.raises(ConfigError, match="policies"):
        load_config(EvaluateConfig, None, ["policies=[dpo, dpo]"]).validate()

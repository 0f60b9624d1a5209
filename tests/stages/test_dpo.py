"""The DPO stage on tiny models: the token ids it trains on, the reference (no copy with LoRA, one frozen copy
otherwise, none for SimPO), each preference loss reaching TRL, SimPO's loss against its formula, the evaluation of a
DPO policy without a reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from support import demo_rows, plain_tokenizer, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import EVAL_RESULTS_FILE, compute_fingerprint, read_manifest
from rlhf.config import DPOConfig, EvaluateConfig, ModelConfig, load_config, semantic_dict
from rlhf.data import prepare_dataset, to_hf_dataset
from rlhf.errors import ConfigError
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.report import curves_figure, load_stage
from rlhf.text import TextContract
from rlhf.tracking import read_metrics
from rlhf.trl_bridge import CPO_COLUMNS, experimental_cpo, last_trainer_checkpoint
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
    (["simpo_gamma=1.0"], "simpo_gamma applies to loss_type simpo only, not sigmoid"),
    (["loss_type=simpo", "simpo_gamma=-0.1"], "simpo_gamma"),
    (["loss_type=apo_zero", "label_smoothing=0.1"], "label_smoothing applies to loss_type sigmoid, robust or simpo"),
])
def test_config_errors_name_the_keys(setup, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(setup, "x", *overrides).validate()


def test_simpo_gamma_enters_the_fingerprint_with_simpo_only(setup):
    """Configs that do not use simpo_gamma keep the fingerprint they had before it existed."""
    def fingerprint(*extra):
        return compute_fingerprint("dpo", semantic_dict(config(setup, "fp", *extra)), {})

    assert "simpo_gamma" not in semantic_dict(config(setup, "fp"))
    simpo = config(setup, "fp", "loss_type=simpo", "label_smoothing=0.1", "sft_loss_weight=0.5")
    assert semantic_dict(simpo)["simpo_gamma"] == 0.5
    assert fingerprint("loss_type=simpo", "simpo_gamma=1") != fingerprint("loss_type=simpo")


def capture_cpo_batches(monkeypatch) -> list[dict]:
    """Every batch CPOTrainer's collator pads, as it leaves the collator."""
    experimental_cpo()  # imported once, without the experimental-API warning
    from trl.experimental.utils import DPODataCollatorWithPadding

    batches = []
    original = DPODataCollatorWithPadding.__call__
    monkeypatch.setattr(DPODataCollatorWithPadding, "__call__",
                        lambda self, features: batches.append(original(self, features)) or batches[-1])
    return batches


def test_simpo_trains_on_exactly_the_text_contract_ids_and_loads_no_reference(setup, monkeypatch):
    """SimPO through CPOTrainer: every sequence is prompt ids + response ids by the text contract, the labels are
    the response's ids with the prompt (and padding) ignored, each response holds one EOS, at its end; the run
    loads the policy once and no reference, and writes a complete checkpoint and a complete output."""
    batches = capture_cpo_batches(monkeypatch)
    loads, copies = [], []
    load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda cfg: loads.append(cfg) or load(cfg))
    monkeypatch.setattr(dpo, "frozen_copy", lambda cfg: copies.append(cfg))
    cfg = config(setup, "simpo", "loss_type=simpo", "beta=2", "train.max_steps=2", "checkpoint.save_every=2")
    out = dpo.run(cfg)
    assert len(loads) == 1 and not copies

    manifest = read_manifest(out)
    assert manifest["reference"] == "none" and manifest["loss_type"] == "simpo" and manifest["simpo_gamma"] == 0.5
    assert (out / "model.safetensors").is_file() and last_trainer_checkpoint(out).endswith("checkpoint-2")
    metrics = manifest["metrics"]
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["eval/margin"])
    assert "eval/logratio_chosen" not in metrics and metrics["eval/logp_chosen"] < 0  # no reference, no log-ratio
    assert metrics["eval/reward_chosen"] == pytest.approx(2 * metrics["eval/logp_chosen"])
    figure = curves_figure("simpo", {name: load_stage(out.parent, name) for name in ("sft", "reward", "ppo", "dpo")})
    labels = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
    assert "log-prob, chosen" in labels and "log-ratio, chosen" not in labels  # the report draws no fake log-ratio

    contract = TextContract.from_tokenizer(load_tokenizer(dpo.policy_model_config(cfg)))
    rows = prepare_dataset(cfg.data.path, "preference", eval_fraction=0.0, seed=0).train
    expected = {tuple(ids): mask for row in rows for side in ("chosen", "rejected")
                for ids, mask in [contract.sequence(row["prompt"], row[side])]}
    eos, seen = contract.tokenizer.eos_token_id, 0
    for batch in batches:
        assert set(batch) == set(CPO_COLUMNS)
        for side in ("chosen", "rejected"):
            for ids, attention, labels in zip(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                              batch[f"{side}_labels"]):
                n = int(attention.sum())
                assert attention[:n].all() and not attention[n:].any() and (labels[n:] == -100).all()
                sequence = tuple(ids[:n].tolist())
                assert sequence in expected, "a sequence the text contract does not give"
                mask = expected[sequence]
                assert labels[:n].tolist() == [t if m else -100 for t, m in zip(sequence, mask)]
                response = [t for t, m in zip(sequence, mask) if m]
                assert response.count(eos) == 1 and response[-1] == eos
                seen += 1
    assert seen >= 2 * 8 * 2  # both training steps' pairs (and the evaluation's): chosen and rejected


def test_the_cpo_trainer_method_we_override_is_still_there():
    import inspect

    params = list(inspect.signature(experimental_cpo().CPOTrainer.tokenize_row).parameters)
    assert params == ["self", "feature", "model"], (
        f"trl CPOTrainer.tokenize_row changed its signature to {params}: update rlhf.trl_bridge.tokenized_cpo_trainer")


def simpo_loss_by_hand(model, pairs, beta: float, gamma: float, sft_weight: float) -> float:
    """SimPO's loss (Meng et al. 2024, eq. 6) in float64, each sequence run alone (no padding):
    mean over pairs of -log sigmoid(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma), plus
    sft_weight x the chosen tokens' mean NLL."""
    def token_logps(prompt, response):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        return logps[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]]

    losses, nll_sum, nll_count = [], 0.0, 0
    for pair in pairs:
        chosen = token_logps(pair["prompt_ids"], pair["chosen_ids"])
        rejected = token_logps(pair["prompt_ids"], pair["rejected_ids"])
        h = beta * chosen.mean() - beta * rejected.mean() - gamma
        losses.append(-torch.nn.functional.logsigmoid(h).item())
        nll_sum, nll_count = nll_sum - chosen.sum().item(), nll_count + len(chosen)
    return sum(losses) / len(losses) + sft_weight * nll_sum / nll_count


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_simpo_loss_on_a_batch_is_its_formula(setup, tmp_path, sft_weight):
    """The loss CPOTrainer computes on one padded batch of our pairs (float64 weights) equals SimPO's formula by
    hand from the model's per-token log-probs; sft_loss_weight adds the chosen tokens' mean NLL (CPO's term)."""
    cfg = config(setup, "simpo-loss", "loss_type=simpo", "beta=2.5", "simpo_gamma=0.3",
                 f"sft_loss_weight={sft_weight}")
    tokenizer = load_tokenizer(dpo.policy_model_config(cfg))
    contract = TextContract.from_tokenizer(tokenizer)
    rows = prepare_dataset(cfg.data.path, "preference", eval_fraction=0.0, seed=0).train[:6]
    pairs = [dpo.encode_pair(contract, row) for row in rows]
    model = load_causal_lm(ModelConfig(name_or_path=str(setup[1]))).double().eval()
    trainer = dpo.preference_trainer(cfg, model, None, args=dpo.trl_args(cfg, tmp_path, 1, False),
                                     train_dataset=to_hf_dataset(pairs), processing_class=tokenizer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))]))
    assert len({len(p["chosen_ids"]) for p in pairs} | {len(p["rejected_ids"]) for p in pairs}) > 1  # padded
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert abs(loss - simpo_loss_by_hand(model, pairs, 2.5, 0.3, sft_weight)) < 1e-6


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

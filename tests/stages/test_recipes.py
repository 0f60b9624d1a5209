"""Each real-model recipe trains for 2 steps on a tiny random model of the same model_type, with its own batch
arithmetic and target modules, on local data in the recipe's format."""

from __future__ import annotations

import pytest
from support import chatml_tokenizer, demo_rows, save_tiny_causal_lm, write_jsonl

from rlhf.checkpoint import read_manifest
from rlhf.config import RewardConfig, SFTConfig, load_config
from rlhf.launcher import REPO_ROOT
from stages import reward, sft

RECIPE = REPO_ROOT / "configs" / "recipes" / "qwen2.5-0.5b"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return root, save_tiny_causal_lm(root / "qwen2", chatml_tokenizer(), model_type="qwen2")


def _local(root, *extra):
    # Only what cannot run here, or would be slow on a CPU, changes: the model and data locations, the hub splits,
    # tracking, the step count, float32 instead of bf16, and 4 micro-batches of 16 instead of 16 of 4 per step.
    return [f"run_dir={root}", "data.split=train", "data.eval_split=null", "data.eval_fraction=0.1",
            "logging.report_to=[jsonl]", "train.max_steps=2", "model.dtype=float32", "train.micro_batch_size=16",
            *extra]


def test_sft_recipe_two_steps(tiny_qwen):
    root, model = tiny_qwen
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]}
            for r in demo_rows("sft.jsonl", 160)]
    data = write_jsonl(root / "ultrachat.jsonl", rows)
    cfg = load_config(SFTConfig, RECIPE / "sft.yaml",
                      _local(root, f"model.name_or_path={model}", f"data.path={data}"))
    assert cfg.peft.method == "lora" and cfg.train.batch_size == 64
    out = sft.run(cfg)
    manifest = read_manifest(out)
    assert manifest["metrics"]["train/steps"] == 2 and manifest["saved_as"] == "model"


def test_reward_recipe_two_steps(tiny_qwen):
    root, model = tiny_qwen
    rows = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['chosen']}",
             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['rejected']}"}
            for r in demo_rows("preferences.jsonl", 160)]
    data = write_jsonl(root / "hh.jsonl", rows)
    cfg = load_config(RewardConfig, RECIPE / "reward.yaml",
                      _local(root, f"model.name_or_path={model}", f"data.path={data}"))
    out = reward.run(cfg)
    manifest = read_manifest(out)
    assert manifest["metrics"]["train/steps"] == 2
    assert manifest["data"]["format"] == "implicit_preference"


def test_ppo_recipe_two_updates(tiny_qwen, tmp_path):
    from support import save_reward_model

    from rlhf.config import PPOConfig
    from stages import ppo

    root, model = tiny_qwen
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(model)
    rm = save_reward_model(tmp_path / "rm", model, tokenizer)
    rows = [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
             "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"}
            for r in demo_rows("preferences.jsonl", 80)]
    data = write_jsonl(root / "hh-prompts.jsonl", rows)
    # Only locations, sizes and precision change; LoRA targets, the critic's source and the batch arithmetic
    # (4 minibatches of micro-batches) are the recipe's.
    cfg = load_config(PPOConfig, RECIPE / "ppo.yaml", [
        f"run_dir={tmp_path}", f"model.name_or_path={model}", f"reward_model.name_or_path={rm}",
        f"data.path={data}", "data.split=train", "data.eval_split=null", "data.eval_fraction=0.1",
        "model.dtype=float32", "reward_model.dtype=float32", "logging.report_to=[jsonl]",
        "checks.min_eos_rate=0", "rollout.batch_size=16",
        "rollout.max_new_tokens=8", "rollout.score_norm=none", "ppo.num_updates=2", "ppo.micro_batch_size=2",
        "eval.num_prompts=4", "eval.every=0", "checkpoint.save_every=0"])
    assert cfg.peft.method == cfg.critic_peft.method == "lora" and cfg.ppo.num_minibatches == 4
    out = ppo.run(cfg)
    manifest = read_manifest(out)
    assert manifest["critic_init"] == "reward" and manifest["reference"] == "adapters disabled"
    assert (out / "policy" / "model.safetensors").is_file()

"""A dataset saved in UltraFeedback binarized's layout trains the stages it is for: SFT from its messages
(train_sft), then the reward model and DPO from its preference pairs (train_prefs, held out: test_prefs)."""

from __future__ import annotations

import math

import pytest
from support import plain_tokenizer, save_tiny_causal_lm, save_ultrafeedback

from rlhf.checkpoint import read_manifest
from rlhf.config import DPOConfig, RewardConfig, SFTConfig, load_config
from stages import dpo, reward, sft


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("uf_stages")
    data = save_ultrafeedback(root / "ultrafeedback_binarized")
    base = save_tiny_causal_lm(root / "base", plain_tokenizer())
    out = sft.run(load_config(SFTConfig, None, [
        f"run_dir={root / 'run'}", f"model.name_or_path={base}", f"data.path={data}", "data.split=train_sft",
        "data.eval_split=test_sft", "data.max_length=256", "train.max_steps=2", "train.batch_size=8",
        "train.micro_batch_size=8"]))
    return root, data, out


def test_sft_trains_on_the_messages_split(sft_out):
    _, _, out = sft_out
    manifest = read_manifest(out)
    assert manifest["data"]["format"] == "messages" and manifest["data"]["split"] == "train_sft"
    assert manifest["chat_template_added"] and math.isfinite(manifest["metrics"]["eval/loss"])


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_the_preference_stages_train_on_the_prefs_split(sft_out, stage):
    root, data, _ = sft_out
    module, config_cls = {"reward": (reward, RewardConfig), "dpo": (dpo, DPOConfig)}[stage]
    out = module.run(load_config(config_cls, None, [
        f"run_dir={root / 'run'}", f"data.path={data}", "data.split=train_prefs", "data.eval_split=test_prefs",
        *(["data.margin_from_scores=true"] if stage == "reward" else []), "data.max_length=256", "train.max_steps=2", "train.batch_size=8",
        "train.micro_batch_size=8"]))
    manifest = read_manifest(out)
    assert manifest["data"]["format"] == "conversation_preference"
    assert manifest["data"]["num_train"] == 48 and manifest["data"]["num_eval"] == 12
    assert math.isfinite(manifest["metrics"]["eval/accuracy"])

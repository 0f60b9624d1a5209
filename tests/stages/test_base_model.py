"""The shipped base model (data/base-model/) writes reviews that end and parse."""

from __future__ import annotations

from support import sample_base_model

from rlhf.checkpoint import read_manifest
from rlhf.launcher import REPO_ROOT

BASE = REPO_ROOT / "data" / "base-model"


def test_shipped_base_model_is_a_complete_pretrain_output():
    from transformers import AutoTokenizer

    manifest = read_manifest(BASE)
    assert manifest is not None and manifest["stage"] == "pretrain"
    assert (BASE / "model.safetensors").is_file() and (BASE / "tokenizer.json").is_file()
    assert not list(BASE.glob("*.bin")) and not list(BASE.glob("*.pt"))  # safetensors only
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_base_model_samples_end_in_eos_and_are_grammatical():
    ended, grammatical = sample_base_model(BASE, n=100, seed=0)
    assert ended >= 90, f"{ended}/100 samples end in EOS"
    assert grammatical >= 80, f"{grammatical}/100 samples are grammatical"

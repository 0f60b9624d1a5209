"""Helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.demo import judge


def sample_base_model(model_dir: str | Path, n: int = 100, seed: int = 0) -> tuple[int, int]:
    """Sample ``n`` reviews unconditionally (from the EOS-as-BOS token) at temperature 1; returns how many ended in
    EOS and how many the gold judge finds grammatical."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    start = torch.full((n, 1), tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=120, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    ended = grammatical = 0
    for row in out[:, 1:].tolist():
        eos = tokenizer.eos_token_id in row
        text = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if eos else row, skip_special_tokens=True)
        ended += eos
        grammatical += judge("", text, eos).grammatical
    return ended, grammatical

"""Helpers shared by several test modules."""

from __future__ import annotations

import json
import struct
import time
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


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "the lamp is great .", "this kettle is loud .", "i would buy it again .", "the fan is quiet and cheap .",
    "hello there , how are you ?", "tell me about the lamp .", "it is worth the money .", "my phone is solid .",
] * 20


def train_tokenizer(specials: list[str], *, eos: str, pad: str | None, bos: str | None = None,
                    chat_template: str | None = None, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    kwargs = {"eos_token": eos}
    if pad:
        kwargs["pad_token"] = pad
    if bos:
        kwargs["bos_token"] = bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def chatml_tokenizer():
    """Like a Qwen instruct tokenizer: ChatML template, EOS <|im_end|>, pad <|endoftext|>, no BOS."""
    return train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                           pad="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def plain_tokenizer():
    """Like the demo base model's: EOS doubles as BOS, a separate pad token, no chat template."""
    return train_tokenizer(["<|endoftext|>", "<pad>"], eos="<|endoftext|>", pad="<pad>", bos="<|endoftext|>")


def save_tiny_causal_lm(path: Path, tokenizer, *, model_type: str = "gpt2", seed: int = 0) -> Path:
    """A randomly initialised 2-layer causal LM (gpt2 or qwen2) saved with its tokenizer."""
    import transformers

    torch.manual_seed(seed)
    if model_type == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)
        model = transformers.GPT2LMHeadModel(config)
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        raise ValueError(model_type)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_rows(name: str, n: int) -> list[dict]:
    """The first ``n`` rows of a bundled demo dataset."""
    import json

    from rlhf.launcher import REPO_ROOT

    with (REPO_ROOT / "data" / "demo" / name).open() as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def ultrafeedback_rows(n: int, start: int = 0) -> list[dict]:
    """Rows in UltraFeedback binarized's own layout, made from the demo's preference pairs: ``prompt`` a string,
    ``chosen`` / ``rejected`` / ``messages`` whole conversations whose user turn is the prompt, ``prompt_id``,
    ``score_chosen`` and ``score_rejected``."""
    import hashlib

    rows = []
    for i, pair in enumerate(demo_rows("preferences.jsonl", start + n)[start:]):
        prompt = pair["prompt"]
        chosen = [{"content": prompt, "role": "user"}, {"content": pair["chosen"].strip(), "role": "assistant"}]
        rejected = [{"content": prompt, "role": "user"}, {"content": pair["rejected"].strip(), "role": "assistant"}]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen,
                     "rejected": rejected, "messages": chosen, "score_chosen": 8.0 - i % 3,
                     "score_rejected": 4.5 + i % 2})
    return rows


def save_ultrafeedback(path: Path, n: int = 48) -> Path:
    """A ``save_to_disk`` DatasetDict with UltraFeedback binarized's split names: train_prefs, test_prefs,
    train_sft, test_sft (the sft splits hold the chosen conversations, as the real dataset's do)."""
    import datasets

    train = ultrafeedback_rows(n)
    seen = {row["prompt"] for row in train}
    test = [row for row in ultrafeedback_rows(4 * n, start=n) if row["prompt"] not in seen][: max(n // 4, 4)]
    splits = {"train_prefs": train, "test_prefs": test, "train_sft": train, "test_sft": test}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return path


def save_tiny_sft_and_reward(root: Path) -> tuple[Path, Path]:
    """A tiny SFT policy (``root/sft``) and a reward model built on it (``root/reward``), sharing the plain
    tokenizer: the models of the PPO, evaluation and fault tests."""
    tokenizer = plain_tokenizer()
    sft = save_tiny_causal_lm(root / "sft", tokenizer)
    return sft, save_reward_model(root / "reward", sft, tokenizer)


def save_reward_model(path, base, tokenizer, seed=1):
    """A sequence-classification model on ``base`` with a seeded random head, as a reward stage would save it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (run-*.wandb): a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type); types 1 = full, 2/3/4 = first/middle/last piece of a protobuf `Record`.
    The file may be read while W&B's service is still appending to it: a chunk cut short at the end is left out."""
    from wandb.proto import wandb_internal_pb2

    block, chunk_header = 32768, 7
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + chunk_header <= len(data):
        room = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + chunk_header])
        if room < chunk_header or kind == 0:  # the zero padding at the end of a block
            pos += room
            continue
        if pos + chunk_header + length > len(data):  # a chunk W&B's service is still writing
            break
        pending += data[pos + chunk_header : pos + chunk_header + length]
        pos += chunk_header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(log_file: Path) -> list:
    """The records of a run-*.wandb file once it holds the exit record: W&B's service can still be flushing the file
    for a moment after `finish` returns."""
    deadline = time.monotonic() + 15
    records = wandb_records(log_file)
    while not any(record.HasField("exit") for record in records) and time.monotonic() < deadline:
        time.sleep(0.05)
        records = wandb_records(log_file)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_run_contents(run_dir: Path) -> dict:
    """The run, config, history rows and summary recorded in one offline run directory."""
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict = {"run": None, "config": {}, "history": [], "summary": {}}
    for record in finished_wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({item_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({item_key(i): json.loads(i.value_json) for i in record.summary.update})
    return out


def spy_on_length_grouping(monkeypatch) -> list:
    """Record (order, lengths) each time transformers' length-grouped sampler is iterated."""
    from transformers import trainer_pt_utils

    seen = []
    sample = trainer_pt_utils.LengthGroupedSampler.__iter__

    def spy(self):
        order = list(sample(self))
        seen.append((order, list(self.lengths)))
        return iter(order)

    monkeypatch.setattr(trainer_pt_utils.LengthGroupedSampler, "__iter__", spy)
    return seen


def mean_batch_spread(order, lengths, batch_size: int) -> float:
    """Mean (longest - shortest) length within the consecutive batches of ``order``."""
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)


def spy_on_step_sorting(monkeypatch) -> list:
    """Record the order each time the stages' step-sorted sampler (train.sort_micro_batches) is iterated."""
    from rlhf.trl_bridge import StepSortedSampler

    seen = []
    sample = StepSortedSampler.__iter__

    def spy(self):
        order = list(sample(self))
        seen.append(order)
        return iter(order)

    monkeypatch.setattr(StepSortedSampler, "__iter__", spy)
    return seen


def spy_on_packed_products(monkeypatch) -> list:
    """Pack every linear layer, however small (the tiny models' are under `rlhf.onednn.MIN_PACKED_WEIGHTS`), and
    record one entry per product that runs through oneDNN's packed kernel; skips the test without oneDNN."""
    import pytest

    import rlhf.onednn as onednn

    if not onednn.available():
        pytest.skip("this torch has no oneDNN linear kernels")
    monkeypatch.setattr(onednn, "MIN_PACKED_WEIGHTS", 1)
    products = []
    real = onednn._linear
    monkeypatch.setattr(onednn, "_linear", lambda *args: products.append(1) or real(*args))
    return products


def tiny_ppo_inputs(root: Path, prompts: int, eval_prompts: int) -> tuple[Path, Path, Path, Path, Path]:
    """PPO's inputs in ``root``: the tiny SFT policy and reward model, and that many demo prompts and held-out
    prompts; ``(root, sft, reward, prompts, eval_prompts)``."""
    sft, rm = save_tiny_sft_and_reward(root)
    return (root, sft, rm, write_jsonl(root / "prompts.jsonl", demo_rows("prompts.jsonl", prompts)),
            write_jsonl(root / "eval.jsonl", demo_rows("eval_prompts.jsonl", eval_prompts)))


#: Accelerate's environment for DeepSpeed ZeRO-3 (what `accelerate launch` exports from configs/accelerate/zero3.yaml),
#: for torchrun, which starts two CPU processes that see each other.
ZERO3_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
             "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
             "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
             "ACCELERATE_MIXED_PRECISION": "no"}
